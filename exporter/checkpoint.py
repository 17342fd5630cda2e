"""A checkpoint read a tensor at a time: the model's structure without its weights, and one module's weights loaded
when it is needed and dropped after (exporter.stream compresses a decoder block at a time this way).

The structure is the transformers model built on the meta device (no memory); `materialize` gives a module real
fp32 weights read from the folder's safetensors shards, each tensor's bytes on their own (`_header`), and
`release` sends them back to the meta device. Only the folder's safetensors are read: a pickle checkpoint cannot be
read a tensor at a time, and a GGUF file is first converted once, a tensor at a time, into a cached folder
(exporter.gguf_folder).
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from exporter.architectures import arch_for
from exporter.errors import UsageError

INDEX_FILE = "model.safetensors.index.json"
READ_BYTES = 1 << 24  # a tensor is read and converted 16 MiB at a time
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class ShardWriter:
    """Writes a checkpoint's tensors into numbered safetensors shards and the index that maps names to shards, as
    sharded Hugging Face checkpoints are, holding one shard's tensors in memory at a time (a shard is written when
    `flush` is called or it reaches `shard_bytes`)."""

    def __init__(self, folder: Path, shard_bytes: float = 1e9):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.shards = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.shards += 1
            file = f"model-{self.shards:05d}.safetensors"
            save_file(self.pending, self.folder / file, metadata={"format": "pt"})
            self.weight_map.update(dict.fromkeys(self.pending, file))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        (self.folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": self.weight_map}))


class Checkpoint:
    """A Hugging Face model folder's tensors, by name, read one at a time."""

    def __init__(self, folder: Path, source: str, trust_remote_code: bool = False):
        self.folder, self.source = folder, source
        self.config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.arch = arch_for(self.config.model_type)
        if self.arch.conv1d:
            raise UsageError(f"--model {source}: layer streaming reads Linear projections; {self.config.model_type} "
                             "stores Conv1D ones (export it in memory: it is small)")
        index = folder / INDEX_FILE
        shards = ({folder / file for file in json.loads(index.read_text())["weight_map"].values()} if index.is_file()
                  else set(folder.glob("*.safetensors")))
        self.entries = {name: (shard, *entry) for shard in sorted(shards)
                        for name, entry in _header(shard, source).items()}
        if not self.entries:
            raise UsageError(f"--model {source}: layer streaming reads safetensors weights and the folder has none")

    def read_into(self, name: str, target: torch.Tensor) -> torch.Tensor:
        """Mutates `target` (contiguous, the tensor's shape; fp32, say): tensor `name` as stored (bf16, say) read
        from its shard alone into it, converted on the way a few MB at a time, so neither the stored bytes nor an
        fp32 temporary are ever held whole beside it (a 128k-row bf16 table at 3B width is 0.8 GB)."""
        if name not in self.entries:
            raise UsageError(f"--model {self.source}: the checkpoint has no tensor {name}; is it complete?")
        shard, dtype, shape, start, _ = self.entries[name]
        flat, itemsize = target.view(shape).view(-1), dtype.itemsize
        step = max(1, min(READ_BYTES // itemsize, len(flat)))  # a norm's weight: a buffer of its own size
        buffer = memoryview(bytearray(step * itemsize))
        with open(shard, "rb") as f:
            f.seek(start)
            for first in range(0, len(flat), step):
                count = min(step, len(flat) - first)
                f.readinto(buffer[:count * itemsize])
                flat[first:first + count].copy_(torch.frombuffer(buffer, dtype=dtype, count=count))
        return target

    def skeleton(self) -> PreTrainedModel:
        """The model with its weights on the meta device (no memory) and its rotary tables computed."""
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        for name, module in list(model.named_modules()):  # rotary tables are computed, not stored
            if name.endswith("rotary_emb"):
                _put(model, name, type(module)(config=model.config))
        return model.eval()

    @contextmanager
    def outside_blocks(self, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
        """`model` (a skeleton) with everything but its blocks loaded (embedding, final norm, lm_head): what runs
        before and after the blocks; dropped again at the end."""
        aside = [self.arch.blocks] + [name for name, _ in model.named_modules() if name.endswith("rotary_emb")]
        head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
        if self.config.tie_word_embeddings and f"{head}.weight" not in self.entries:
            aside.append(head)  # it is the embedding's table: never a table of its own, even for a moment
        with _set_aside(model, aside):  # the blocks stay on the meta device, the computed rotary tables as they are
            self.materialize(model, "")
        model.tie_weights()
        try:
            yield model
        finally:
            with _set_aside(model, aside):
                release(model)
            model.tie_weights()

    def materialize(self, module: nn.Module, prefix: str) -> nn.Module:
        """Mutates `module` (at path `prefix`): its parameters read from the checkpoint, in fp32."""
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                self.read_into(".".join(filter(None, (prefix, name))), parameter)
        return module

    @torch.no_grad()
    def reload(self, model: nn.Module, parameter: nn.Parameter) -> None:
        """Mutates `parameter` (of `model`): its values read from the checkpoint again."""
        name = next(name for name, p in model.named_parameters() if p is parameter)  # a tied one: its first name
        self.read_into(name, parameter)

    def block_path(self, index: int) -> str:
        return f"{self.arch.blocks}.{index}"


def release(module: nn.Module) -> None:
    """Mutates `module`: its weights dropped (back on the meta device), and freed memory handed back to the system
    (`malloc_trim`; a no-op where the C library is not glibc)."""
    module.to_empty(device="meta")
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def hand_back_freed_memory() -> None:
    """From now on, this process hands freed memory back to the system: every block above 128 KiB is mapped on its
    own and unmapped when freed, and the heap is trimmed down to 128 KiB of free space. By default glibc raises its
    mapping threshold each time a large block is freed (up to 32 MB) and keeps freed blocks below it for reuse, so
    an export's resident memory climbed to the sum of its stages' peaks instead of the largest (measured: rounding a
    qwen2-0.5b shape's 151936-row table to int4 kept 0.75 GB resident instead of 0.16; at Llama-2-7B width the
    factorizing export's pricing stage held 2.98 GB instead of 2.46). A no-op where the C library is not glibc."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MALLOC_MAP_ABOVE)
        _LIBC.mallopt(M_TRIM_THRESHOLD, MALLOC_MAP_ABOVE)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc malloc.h)
MALLOC_MAP_ABOVE = 128 * 1024  # bytes: glibc's default mmap threshold, and its trim threshold
_LIBC = _glibc()


@contextmanager
def _set_aside(model: nn.Module, paths: list[str]) -> Iterator[None]:
    """`model` without these submodules for a while (empty modules in their place), then with them again."""
    kept = {path: model.get_submodule(path) for path in paths}
    for path in paths:
        _put(model, path, nn.Module())
    try:
        yield
    finally:
        for path, module in kept.items():
            _put(model, path, module)


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    """`module` at `path` in `model`, in place of what was there."""
    owner, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(owner), attribute, module)


def _header(shard: Path, source: str) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file's tensors: an 8-byte little-endian header
    length, the JSON header, then the data. The safetensors library maps a whole shard into the process instead
    (a real checkpoint's shards are 2-5 GB); a tensor's own bytes are all a streamed export needs."""
    with open(shard, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise UsageError(f"--model {source}: {shard.name} is not a safetensors file; is it corrupt?") from None
    data = 8 + size
    return {name: (DTYPES[entry["dtype"]], entry["shape"], data + entry["data_offsets"][0],
                   data + entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"}
