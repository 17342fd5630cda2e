"""A graph's weights file (`<name>.onnx.data`), written as the graph is built, so that the graph never holds its
weights in memory (at 7B, an fp32 reference graph would be 28 GB of protobuf).

External data is required above protobuf's 2 GB, and it pays below too: onnxruntime maps the file instead of
parsing a second copy of every weight out of the protobuf. Tensors with identical bytes are stored once and read
from the same place (the embedding's int4 rows and the tied lm_head's); each starts at a multiple of
`DATA_ALIGNMENT` bytes. Tensors under `EXTERNAL_THRESHOLD` bytes stay inside the graph.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the graph file
DATA_ALIGNMENT = 64  # bytes: each tensor in the data file starts at a multiple of this


class DataFile:
    """An open weights file: `tensor()` writes an array into it and returns the TensorProto that points there."""

    def __init__(self, path: Path, alignment: int = DATA_ALIGNMENT):
        self.path, self.alignment = path, alignment
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close() / the with block
        self._stored: dict[bytes, tuple[int, int]] = {}

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < EXTERNAL_THRESHOLD:
            return numpy_helper.from_array(array, name)
        tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        self._point(tensor, memoryview(array).cast("B"))
        return tensor

    def externalize(self, tensor: onnx.TensorProto) -> None:
        """Move a built tensor's bytes into the file (a graph built in memory, saved afterwards)."""
        if len(tensor.raw_data) >= EXTERNAL_THRESHOLD:
            raw = tensor.raw_data
            tensor.ClearField("raw_data")
            self._point(tensor, raw)

    def _point(self, tensor: onnx.TensorProto, raw) -> None:
        digest = hashlib.sha256(raw).digest()
        if digest not in self._stored:
            self._file.write(b"\0" * (-self._file.tell() % self.alignment))
            self._stored[digest] = (self._file.tell(), len(raw))
            self._file.write(raw)
        offset, length = self._stored[digest]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
