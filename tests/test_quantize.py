"""The PyTorch mirror of onnxruntime's weight quantizer must round exactly as the quantizer does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporter.quantize import quantize_graph, round_trip


def single_matmul(path, weight: np.ndarray) -> None:
    k = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))


@pytest.mark.parametrize(("k", "n"), [(64, 48), (40, 24), (8, 16), (160, 64)])
def test_round_trip_matches_onnxruntime(tmp_path, k, n):
    rng = np.random.default_rng(k * n)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    # exact ties between two levels: the case where rounding conventions differ
    weight[:4, :] = np.round(weight[:4, :] * 64) / 64 + 1 / 128
    single_matmul(tmp_path / "m.onnx", weight)
    quantized = quantize_graph(tmp_path / "m.onnx", "int4")
    assert {node.op_type for node in quantized.graph.node} == {"MatMulNBits"}
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.eye(k, dtype=np.float32)  # identity input: the output *is* the dequantized weight
    dequantized = session.run(None, {"x": x})[0]
    mirror = round_trip(torch.from_numpy(weight.T.copy()), 4).numpy().T
    np.testing.assert_allclose(dequantized, mirror, rtol=0, atol=1e-7)
    assert not np.allclose(mirror, weight)  # it did quantize


def test_round_trip_keeps_zero_blocks():
    weight = torch.zeros(3, 40)
    assert torch.equal(round_trip(weight, 4), weight)
