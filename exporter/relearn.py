"""Basis selection by relearning (Basel, Li et al., arXiv 2405.15877), sized for a CPU and minutes.

Each planned projection W becomes a BasisLinear over the bases of its *whitened* SVD, W L = U diag(s) V^T with
L the Cholesky factor of the layer's input Gram matrix (as SVD-LLM), so W = sum_i s_i u_i (V^T L^-1)_i: U and
V^T L^-1 frozen, the coefficients trainable as w with s = w^2 (so they stay non-negative), plus new bases A·B
(rank `NEW_BASES`, A zero-initialised so training starts from the original model). Whitened bases matter: on
SmolLM2, relearning the plain SVD's bases ended 30-100x worse in perplexity than SVD-LLM, because dropping plain
bases throws away directions the inputs use.

The coefficients are trained on the task's calibration data with the ordinary next-token loss; after a first
epoch of relearning only, the smallest relearned coefficients of each layer are masked out permanently in
`PRUNE_STEPS` small steps, the kept count shrinking geometrically to the planned rank. The result per layer is
the merged matrix U diag(w^2 * mask) V^T L^-1 + A·B, which `select` re-decomposes, whitened again, into the two
factors. Differences from the paper: fewer steps, short sequences and a sample of the data; pruning by count (so
each layer lands exactly on its planned rank) rather than by coefficient mass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, send_to_device
from torch import nn

from exporter.baselines import SVDLLM, whitened_bases
from exporter.collect import activation_stats
from exporter.errors import UsageError
from exporter.select import SelectionMethod, register

NEW_BASES = 32
EPOCHS = 3
PRUNE_STEPS = 20
LEARNING_RATE = 2e-3


class BasisLinear(nn.Module):
    """y = U (w^2 * mask * (V^T x)) + A (B x) + bias, with U and V^T frozen."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("u", u.float().contiguous())
        self.register_buffer("vh", vh.float().contiguous())
        self.register_buffer("mask", torch.ones_like(s, dtype=torch.float32))
        self.w = nn.Parameter(s.float().sqrt())
        self.a = nn.Parameter(torch.zeros(u.shape[0], NEW_BASES))
        self.b = nn.Parameter(torch.randn(NEW_BASES, vh.shape[1]) / vh.shape[1] ** 0.5)
        self.bias = None if bias is None else nn.Parameter(bias.float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coefficients = self.w.square() * self.mask
        y = ((x @ self.vh.T) * coefficients) @ self.u.T + (x @ self.b.T) @ self.a.T
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def prune_to(self, count: int) -> None:
        """Mask all but the `count` largest relearned coefficients (masked ones never come back)."""
        coefficients = self.w.square() * self.mask
        if int(self.mask.sum()) > count:
            keep = torch.topk(coefficients, count).indices
            self.mask.zero_()
            self.mask[keep] = 1.0

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        return (self.u * (self.w.square() * self.mask)) @ self.vh + self.a @ self.b


@register
class Basel(SelectionMethod):
    name = "basel"
    needs = "training"
    passes = EPOCHS + 1  # one forward pass for the whitening, then the training epochs
    description = "Basel: relearn basis coefficients (plus new bases) on the task's data, prune to the rank"

    def collect(self, model, calibration, names, advance=lambda: None, ranks=None):
        if ranks is None:
            raise ValueError("basel needs the planned rank of every layer")
        grams = {name: entry["gram"] for name, entry in activation_stats(model, calibration, names, advance).items()}
        with _relearning(model, grams, self.cache) as layers:
            _train(model, list(calibration.batches), _next_token_loss, layers, ranks, advance)
            return _merged(layers, grams)

    def select(self, weight, bias, stats, rank):
        return SVDLLM(self.cache).select(stats["weight"].to(weight.dtype), bias, stats, rank)

    def scores(self, weight, stats):
        return SVDLLM(self.cache).scores(stats["weight"], stats)


@register
class LayerwiseBasel(Basel):
    """Basel with each decoder block trained on its own inputs and outputs instead of through the whole model, so
    relearning needs one block in memory (layer streaming, exporter.stream): the block's coefficients are trained
    until the block, its planned projections on their bases, reproduces what the dense block computes on the
    task's calibration windows (relative squared error of the block's output), given as inputs what the blocks
    compressed before it produce (exporter.stream.Windows), so it also makes up for their error. Same bases, new
    bases, pruning schedule and re-decomposition as `basel`; the objective is local, as in SVD-LLM's and GPTQ's
    per-layer view, but over a whole block (attention and MLP together) and with the task's data."""

    name = "basel-layerwise"
    needs = "blocks"
    passes = EPOCHS
    description = "Basel a block at a time: each block's bases relearned to reproduce its dense outputs on the task"

    def collect(self, model, calibration, names, advance=lambda: None, ranks=None):
        raise UsageError("basel-layerwise relearns a block at a time: it runs with --layer-streaming")

    def collect_block(self, model, block, inputs, outputs, grams, ranks):
        planned = {name: grams[name]["gram"] for name in ranks}
        with _relearning(model, planned, self.cache) as layers:
            examples = [(x.hidden, x.kwargs, y.hidden) for x, y in zip(inputs, outputs, strict=True)]
            _train(block, examples, _block_output_loss, layers, ranks, lambda: None)
            return _merged(layers, planned)


def _next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def _block_output_loss(block: nn.Module, example: tuple) -> torch.Tensor:
    """Squared error of the block's output against the dense block's, relative to the dense output's energy."""
    hidden, kwargs, target = example
    out = block(hidden, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return (out - target).square().sum() / target.square().sum()


@contextmanager
def _relearning(model: nn.Module, grams: dict[str, torch.Tensor], cache) -> Iterator[dict[str, BasisLinear]]:
    """Each projection named in `grams` swapped for a BasisLinear over the bases of its whitened SVD, with only
    the coefficients and new bases trainable; the model leaves as it came (modules and requires_grad flags)."""
    originals = {name: model.get_submodule(name) for name in grams}
    layers = {}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for name, module in originals.items():
            u, s, unwhitened = whitened_bases(module.weight, grams[name], name, cache)  # W = U diag(s) V^T L^-1
            layers[name] = BasisLinear(u, s, unwhitened, None if module.bias is None else module.bias.detach())
            _swap(model, name, layers[name])
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            for p in (layer.w, layer.a, layer.b):
                p.requires_grad_(True)
        yield layers
    finally:
        for name, module in originals.items():
            _swap(model, name, module)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _merged(layers: dict[str, BasisLinear], grams: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """What `select` re-decomposes: each layer's relearned matrix and the Gram matrix to whiten it by."""
    return {name: {"weight": layer.merged(), "gram": grams[name]} for name, layer in layers.items()}


def _train(module: nn.Module, examples: list, loss_of: Callable[[nn.Module, Any], torch.Tensor],
           layers: dict[str, BasisLinear], ranks: dict[str, int], advance: Callable[[], None]) -> None:
    """`EPOCHS` passes of Adam over `examples` on the layers' coefficients and new bases, minimising
    `loss_of(module, example)`, pruning each layer down to its rank after the first epoch.

    The training loop runs on Hugging Face accelerate: one process on this machine's CPU (or its GPU), or data
    parallel (DDP: gloo on CPUs, NCCL on GPUs) over every process of a torchrun / `accelerate launch` (each takes
    its share of the examples, the gradients are averaged, so every process prunes the same bases). The frozen
    bases are buffers that never change, so they are not re-broadcast each step. `module` comes back on the CPU."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # cpu=True is what lets torchrun's CPU ranks meet
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # the merged weights are read from the layers' own parameters, which sharding would split across ranks
        raise UsageError(f"relearning runs data-parallel; {accelerator.distributed_type.value} sharding is not "
                         "supported yet: launch with torchrun or `accelerate launch --multi_gpu`")
    trainable = [p for layer in layers.values() for p in (layer.w, layer.a, layer.b)]
    optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
    wrapped, optimizer = accelerator.prepare(module, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    share = examples[rank::world][: max(1, len(examples) // world)]
    total = EPOCHS * len(share)
    prune_from = len(share)  # one epoch of relearning only, then prune while training
    prune_every = max(1, (total - prune_from) // PRUNE_STEPS)
    step = 0
    for _ in range(EPOCHS):
        for example in share:
            with torch.enable_grad():
                loss = loss_of(wrapped, send_to_device(example, accelerator.device))
                optimizer.zero_grad()
                accelerator.backward(loss)
                optimizer.step()
            step += 1
            if step >= prune_from and (step - prune_from) % prune_every == 0:
                done = min(1.0, (step - prune_from + prune_every) / (total - prune_from))
                for name, layer in layers.items():
                    full = layer.w.numel()
                    layer.prune_to(round(full * (ranks[name] / full) ** done))
            advance()
    for name, layer in layers.items():
        layer.prune_to(ranks[name])
    accelerator.unwrap_model(wrapped).to("cpu")


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
