"""How much quality each layer loses at each rank, at the shipped precision: the prices the planner's knapsack uses.

A change δW of one projection changes its outputs on the calibration data by δy = δW x; to second order the
per-token loss grows by ½ E[Σ_j F_j δy_j²], with F_j the mean squared gradient of the per-token loss with respect
to output j (the diagonal Fisher information of the layer's outputs, one backward pass over the calibration data,
`output_fisher`). With the inputs' Gram matrix G = L Lᵀ that is ½ ||√F δW L||²_F, computed exactly per candidate:
- truncation to rank r in the whitened basis (W L = U S Vᵀ, the bases SVD-LLM and the whitened methods keep):
  the dropped bases cost ½ Σ_{i≥r} s_i² Σ_j F_j U_ji², exact for every r from one SVD;
- int4 rounding: measured by rounding the rank-r0 factors (r0 the middle candidate) and the dense weight to
  nearest and pricing both errors the same way; a factor's rounding error is taken to scale with the energy it
  keeps. A factorized layer's cost is truncation + its factors' rounding - the dense weight's rounding, i.e. the
  loss against the layer left dense at the same precision (the knapsack's baseline).
Costs are in nats per token and add up over layers to the plan's estimated loss increase; tests check the estimate
against the measured loss increase of real factorizations. A model exported a block at a time is priced a block at
a time (`streamed_costs`): the same statistics, from two passes over its checkpoint.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from exporter.baselines import whitened_svd
from exporter.calibration import Calibration
from exporter.checkpoint import Checkpoint, release
from exporter.collect import InputStats, grams_on_disk
from exporter.contracts import LayerPlan, ModelSpec
from exporter.quantize import round_to_nearest
from exporter.select import row_bands, single_thread, transposed_product
from exporter.stream import Head, embed, through


def output_fisher(model: nn.Module, calibration: Calibration, names: list[str],
                  advance: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """Per named projection: the mean over tokens of (∂ℓ_t/∂y_j)², ℓ_t each token's own loss (float64, d_out)."""
    fisher: dict[str, torch.Tensor] = {}
    tokens = 0
    # gradients must flow to every projection's output, not to any weight: the embedding output starts the graph
    start = model.get_input_embeddings().register_forward_hook(lambda _, __, output: output.requires_grad_())
    try:
        with _frozen(model), _output_gradient_squares(model, names, fisher):
            for batch in calibration.batches:
                with torch.enable_grad():
                    (model(input_ids=batch, labels=batch).loss * _predicted(batch)).backward()  # summed per token
                tokens += _predicted(batch)
                advance()
    finally:
        start.remove()
    return {name: value / tokens for name, value in fisher.items()}


def streamed_costs(checkpoint: Checkpoint, model: PreTrainedModel, spec: ModelSpec, calibration: Calibration,
                   ranks: Callable[[LayerPlan], list[int]], precision: str, cache=None,
                   on_block: Callable[[], None] = lambda: None) -> dict[str, dict[int, float]]:
    """`layer_costs` of every projection, the whole model never in memory (layer streaming, `model` a skeleton):
    the same Gram matrices and output Fisher information `output_fisher` and the in-memory statistics give, from
    two passes over the checkpoint. Forward, the calibration windows run through the dense blocks, each block's
    inputs set aside in a temporary file. Then the per-token losses' gradient at the final hidden states runs back
    through the blocks, last to first: each block is read again and run forward on its saved inputs (its
    projections' input Gram matrices collected on the way) and backward from its outputs' gradient (its
    projections' squared output gradients summed: their Fisher information); the block is dropped and its layers
    are priced, each weight read again alone, and the gradient of its inputs goes on to the block before it.
    Two block reads, a forward and a backward more than an export without layer sensitivity; in memory, one
    block, its statistics and the windows' states."""
    blocks = checkpoint.arch.blocks
    tokens = sum(_predicted(batch) for batch in calibration.batches)
    costs: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgeslim-sensitivity-") as folder:
        with checkpoint.outside_blocks(model):
            pieces = embed(model, blocks, list(calibration.batches))
        for index in range(spec.num_layers):
            torch.save([piece.hidden for piece in pieces], Path(folder) / f"{index}.pt")
            prefix = checkpoint.block_path(index)
            block = checkpoint.materialize(model.get_submodule(prefix), prefix)
            pieces = through(block, pieces)
            release(block)
            on_block()
        with checkpoint.outside_blocks(model), _frozen(model):
            head = Head(model, checkpoint.arch.final_norm)
            gradients = [head.loss_gradient(piece.hidden, batch)
                         for piece, batch in zip(pieces, calibration.batches, strict=True)]
        arguments = [piece.kwargs for piece in pieces]  # the final states are done with
        del pieces
        for index in reversed(range(spec.num_layers)):
            prefix = checkpoint.block_path(index)
            block = checkpoint.materialize(model.get_submodule(prefix), prefix)
            layers = [layer for layer in spec.layers if layer.name.startswith(prefix + ".")]
            names = [layer.name for layer in layers]
            stats, fisher = InputStats(), {}
            inputs = torch.load(Path(folder) / f"{index}.pt")
            with _frozen(block), stats.watching(model, names), _output_gradient_squares(model, names, fisher):
                for k, (hidden, kwargs) in enumerate(zip(inputs, arguments, strict=True)):
                    gradients[k] = _input_gradient(block, hidden, kwargs, gradients[k])
            grams = grams_on_disk(stats.result())  # each read when its layer is priced: 0.69 GB at 7B width
            release(block)  # each layer's weight is read again alone to price it: the block is 0.81 GB at 7B width
            with single_thread():
                for layer in layers:
                    weight = checkpoint.read_into(f"{layer.name}.weight", torch.empty(layer.d_out, layer.d_in))
                    costs[layer.name] = layer_costs(weight, grams[layer.name]["gram"], fisher[layer.name] / tokens,
                                                    ranks(layer), precision, layer.name, cache)
            on_block()
    return costs


def _predicted(batch: torch.Tensor) -> int:
    """Tokens a window's loss is summed over: every position but the last predicts one."""
    return batch.numel() - batch.shape[0]


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """`module` with no parameter requiring gradients for a while (gradients flow to activations only)."""
    flags = {p: p.requires_grad for p in module.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@contextmanager
def _output_gradient_squares(model: nn.Module, names: list[str], fisher: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, each backward adds the squared gradients at every named module's outputs, summed over tokens,
    to `fisher[name]` (float64, d_out)."""
    def keep_gradient(name: str, output: torch.Tensor) -> None:
        def accumulate(grad: torch.Tensor) -> None:
            squares = grad.detach().double().reshape(-1, grad.shape[-1]).square().sum(0)
            fisher[name] = fisher[name] + squares if name in fisher else squares

        if output.requires_grad:
            output.register_hook(accumulate)

    handles = [model.get_submodule(name).register_forward_hook(
        lambda _, __, output, name=name: keep_gradient(name, output)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_gradient(block: nn.Module, hidden: torch.Tensor, kwargs: dict, gradient: torch.Tensor) -> torch.Tensor:
    """Backward through `block` from its outputs' `gradient`: the gradient at its inputs `hidden`."""
    hidden = hidden.detach().requires_grad_()
    with torch.enable_grad():
        out = block(hidden, **kwargs)
        (out[0] if isinstance(out, tuple) else out).backward(gradient)
    return hidden.grad


def layer_costs(weight: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor, ranks: list[int],
                precision: str, layer: str = "", cache=None) -> dict[int, float]:
    """Estimated loss increase per token of this layer at each rank in `ranks`, against the layer left dense at
    `precision` (see the module docstring)."""
    weight = weight.detach()
    u, s = whitened_svd(weight, gram, layer, cache)
    weighted_squares = sum(fisher[rows] @ u[rows].square() for rows in row_bands(*u.shape))  # Σ_j F_j U_ji²
    per_basis = 0.5 * s.square() * weighted_squares  # cost of dropping each basis
    dropped = per_basis.flip(0).cumsum(0).flip(0)  # dropped[r] = cost of dropping bases r, r+1, ...
    total = float(per_basis.sum())
    costs = {r: float(dropped[r]) for r in ranks}
    if precision == "fp32" or not ranks:
        return costs
    scale = fisher.sqrt()[:, None]

    def rounding_cost(exact: Callable[[slice], torch.Tensor], rounded: Callable[[slice], torch.Tensor]) -> float:
        """½ ||√F (exact - rounded) L||² = ½ tr(√F E gram E^T √F), a band of rows at a time: at a 7B model's widths
        each whole matrix is 0.36 GB in float64. The product with the gram is taken in the gram's dtype, float32
        as collected (a float64 copy would be 0.97 GB at d_in 11008); a price needs no more digits."""
        cost = 0.0
        for band in row_bands(*weight.shape):
            error = scale[band] * (exact(band) - rounded(band))
            cost += float(((error.to(gram.dtype) @ gram).double() * error).sum())
        return 0.5 * cost

    def rows(matrix: torch.Tensor) -> Callable[[slice], torch.Tensor]:
        return lambda band: matrix[band].double()

    def product_rows(left: torch.Tensor, right: torch.Tensor) -> Callable[[slice], torch.Tensor]:
        return lambda band: left[band].double() @ right  # right: float64

    dense_cost = rounding_cost(rows(weight), rows(round_to_nearest(weight).dequantize()))
    r0 = ranks[len(ranks) // 2]
    second = u[:, :r0]
    first = transposed_product(second, weight)  # diag(s) V^T L^-1 of the kept bases (exporter.baselines.whitened_svd)
    factor_cost = rounding_cost(product_rows(second, first), product_rows(round_to_nearest(second).dequantize(),
                                                                          round_to_nearest(first).dequantize().double()))
    kept_r0 = max(total - float(dropped[r0]), 1e-30)
    for r in ranks:
        kept = total - float(dropped[r])
        costs[r] = max(costs[r] + factor_cost * kept / kept_r0 - dense_cost, costs[r])
    return costs
