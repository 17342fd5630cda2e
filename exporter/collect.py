"""Calibration passes that collect per-layer statistics, for the methods that need the target data.

Two kinds, as the methods declare (`needs`): activations (what enters each projection: forward hooks) and
gradients (the next-token loss's gradient with respect to each projection's weight: one backward per batch).
Hooks are removed and `requires_grad` flags restored whatever happens, so the model leaves as it came.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from exporter.cache import TensorCache, flatten, unflatten
from exporter.calibration import Calibration

Progress = Callable[[], None]
READ_CHUNK = 16 << 20  # bytes of a Gram matrix read from disk at a time


@contextmanager
def input_hooks(model: nn.Module, names: list[str], on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call `on_input(name, x)` with the input of every named module on each forward."""
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _, args, name=name: on_input(name, args[0]))
        for name in names
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class InputStats:
    """Per layer: `gram` = X^T X / n (d_in x d_in, float32) and `abs_mean` = mean |x| per input channel (float64),
    of the inputs the layers see while `watching` (or are given to `accumulate`). Held in float32, every layer's at
    once; whoever decomposes one (whitening, GPTQ) does so in float64, one at a time (at Llama-2-7B's width the
    float64 copies of all four were 1.37 GB of a 5.4 GB peak).

    Projections that read the same tensor (q/k/v, gate/up) share one entry: computed once, stored once."""

    def __init__(self):
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        self._previous: tuple[torch.Tensor | None, str] = (None, "")  # the last input seen and whose it was

    @contextmanager
    def watching(self, model: nn.Module, names: list[str]) -> Iterator[None]:
        with input_hooks(model, names, self.accumulate):
            yield
        self._previous = (None, "")

    @torch.no_grad()
    def accumulate(self, name: str, x: torch.Tensor) -> None:
        if x is self._previous[0]:
            self.entries[name] = self.entries[self._previous[1]]
            return
        self._previous = (x, name)
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
        if name not in self.entries:  # (a setdefault would make, and drop, a K x K default on every call)
            self.entries[name] = {"gram": torch.zeros(flat.shape[1], flat.shape[1]),
                                  "abs_mean": torch.zeros(flat.shape[1]), "tokens": torch.zeros(())}
        entry = self.entries[name]
        # float32 sums: a float64 product took 3.2x as long (qwen2-0.5b's down_proj: 3.3 s a block)
        entry["gram"].addmm_(flat.T, flat)
        entry["abs_mean"] += flat.abs().sum(0)
        entry["tokens"] += flat.shape[0]

    def result(self) -> dict[str, dict[str, torch.Tensor]]:
        """The means, per layer, handed over: the accumulation is finished, and this object keeps no reference to
        them (`grams_on_disk` can then free the Gram matrices in memory)."""
        entries, self.entries = self.entries, {}
        for entry in {id(entry): entry for entry in entries.values()}.values():
            tokens = float(entry.pop("tokens"))
            entry["gram"].div_(tokens)
            entry["abs_mean"] = entry["abs_mean"].double().div_(tokens)
        return entries


class GramOnDisk(Mapping):
    """An InputStats entry whose Gram matrix waits in an unnamed temporary file (`tempfile.TemporaryFile`: gone
    when the entry is, even if the process is killed): each `entry["gram"]` reads it again into memory of the
    reader's own, which GPTQ's `consume` may free. So a streamed block's Gram matrices (0.69 GB at Llama-2-7B's
    widths, 0.46 of it the MLP's 11008-wide input) are resident only while a layer works with one, not through
    all of the block's decompositions. The other fields stay in memory."""

    def __init__(self, entry: Mapping[str, torch.Tensor]):
        gram = entry["gram"].contiguous()
        self._shape = tuple(gram.shape)
        self._file = tempfile.TemporaryFile(prefix="edgeslim-gram-")  # noqa: SIM115 - lives as long as the entry
        self._file.write(memoryview(gram.numpy()).cast("B"))
        self._fields = {field: value for field, value in entry.items() if field != "gram"}

    def __getitem__(self, field: str) -> torch.Tensor:
        if field != "gram":
            return self._fields[field]
        gram = torch.empty(self._shape)
        flat, chunk = gram.view(-1).view(torch.uint8), bytearray(READ_CHUNK)
        self._file.seek(0)
        for start in range(0, flat.numel(), READ_CHUNK):  # not through numpy: memory numpy has seen cannot be
            read = self._file.readinto(chunk)  # freed in place, as `consume` does
            flat[start:start + read] = torch.frombuffer(chunk, dtype=torch.uint8)[:read]
        return gram

    def __iter__(self) -> Iterator[str]:
        return iter(("gram", *self._fields))

    def __len__(self) -> int:
        return 1 + len(self._fields)


def grams_on_disk(stats: dict[str, Mapping[str, torch.Tensor]]) -> dict[str, GramOnDisk]:
    """`stats` with every entry's Gram matrix in a file (`GramOnDisk`); layers that shared an entry still do."""
    stored: dict[int, GramOnDisk] = {}
    for entry in stats.values():
        if id(entry) not in stored:
            stored[id(entry)] = GramOnDisk(entry)
    return {name: stored[id(entry)] for name, entry in stats.items()}


@torch.no_grad()
def activation_stats(
    model: nn.Module, calibration: Calibration, names: list[str], advance: Progress = lambda: None
) -> dict[str, dict[str, torch.Tensor]]:
    """InputStats of the named layers over the calibration batches."""
    stats = InputStats()
    with stats.watching(model, names):
        for batch in calibration.batches:
            model(input_ids=batch)
            advance()
    return stats.result()


def cached_activation_stats(model: nn.Module, fingerprint: str, calibration: Calibration, names: list[str],
                            cache: TensorCache, advance: Progress = lambda: None) -> dict[str, dict[str, torch.Tensor]]:
    """`activation_stats`, kept in `cache` under the model's fingerprint, the calibration data and the layers."""
    key = ("activations", fingerprint, calibration.fingerprint, repr(names), "float32 sums")
    return unflatten(cache.get_or_compute(key, lambda: flatten(activation_stats(model, calibration, names, advance))))


@contextmanager
def weights_require_grad(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Only the named projections' weights get gradients; every flag is restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in modules.values():
            module.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def weight_gradients(model: nn.Module, modules: dict[str, nn.Module], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """dL/dW of the next-token loss on `batch` for every named projection (inside `weights_require_grad`)."""
    with torch.enable_grad():
        model(input_ids=batch, labels=batch).loss.backward()
    grads = {}
    for name, module in modules.items():
        grads[name] = module.weight.grad
        module.weight.grad = None
    return grads


def gradient_passes(
    model: nn.Module,
    calibration: Calibration,
    names: list[str],
    on_gradient: Callable[[str, torch.Tensor], None],
    advance: Progress = lambda: None,
) -> None:
    """For each batch: next-token loss, backward, then `on_gradient(name, dL/dW)` for every named projection."""
    modules = {name: model.get_submodule(name) for name in names}
    with weights_require_grad(model, modules):
        for batch in calibration.batches:
            with torch.no_grad():
                for name, grad in weight_gradients(model, modules, batch).items():
                    on_gradient(name, grad)
            advance()
