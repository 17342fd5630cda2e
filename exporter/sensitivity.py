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
against the measured loss increase of real factorizations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from exporter.baselines import whitening
from exporter.calibration import Calibration
from exporter.quantize import round_to_nearest
from exporter.select import svd


def output_fisher(model: nn.Module, calibration: Calibration, names: list[str],
                  advance: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """Per named projection: the mean over tokens of (∂ℓ_t/∂y_j)², ℓ_t each token's own loss (float64, d_out)."""
    fisher: dict[str, torch.Tensor] = {}
    tokens = 0

    def keep_gradient(name: str, output: torch.Tensor) -> None:
        def accumulate(grad: torch.Tensor) -> None:
            squares = grad.detach().double().reshape(-1, grad.shape[-1]).square().sum(0)
            fisher[name] = fisher[name] + squares if name in fisher else squares

        output.register_hook(accumulate)

    handles = [model.get_submodule(name).register_forward_hook(
        lambda _, __, output, name=name: keep_gradient(name, output)) for name in names]
    # gradients must flow to every projection's output, not to any weight: the embedding output starts the graph
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _, __, output: output.requires_grad_()))
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for batch in calibration.batches:
            with torch.enable_grad():
                predicted = batch.numel() - batch.shape[0]  # every position but the last predicts a token
                (model(input_ids=batch, labels=batch).loss * predicted).backward()  # summed per-token losses
            tokens += predicted
            advance()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: value / tokens for name, value in fisher.items()}


def layer_costs(weight: torch.Tensor, gram: torch.Tensor, fisher: torch.Tensor, ranks: list[int],
                precision: str, layer: str = "", cache=None) -> dict[int, float]:
    """Estimated loss increase per token of this layer at each rank in `ranks`, against the layer left dense at
    `precision` (see the module docstring)."""
    w = weight.detach().double()
    lower = whitening(gram, layer)
    u, s, vh = svd(w @ lower, layer, cache)
    per_basis = 0.5 * s.square() * (fisher[:, None] * u.square()).sum(0)  # cost of dropping each basis
    dropped = per_basis.flip(0).cumsum(0).flip(0)  # dropped[r] = cost of dropping bases r, r+1, ...
    total = float(per_basis.sum())
    costs = {r: float(dropped[r]) for r in ranks}
    if precision == "fp32" or not ranks:
        return costs
    scale = fisher.sqrt()[:, None]

    def rounding_cost(exact: torch.Tensor, rounded: torch.Tensor) -> float:
        return 0.5 * float((scale * ((exact - rounded) @ lower)).square().sum())

    dense_cost = rounding_cost(w, round_to_nearest(weight).dequantize().double())
    r0 = ranks[len(ranks) // 2]
    first = torch.linalg.solve_triangular(lower, s[:r0, None] * vh[:r0], upper=False, left=False)
    second = u[:, :r0]
    rounded = round_to_nearest(second).dequantize().double() @ round_to_nearest(first).dequantize().double()
    factor_cost = rounding_cost(second @ first, rounded)
    kept_r0 = max(total - float(dropped[r0]), 1e-30)
    for r in ranks:
        kept = total - float(dropped[r])
        costs[r] = max(costs[r] + factor_cost * kept / kept_r0 - dense_cost, costs[r])
    return costs
