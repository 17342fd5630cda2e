"""Replacing planned projections by two small Linears, in place.

A factorized layer is two plain `nn.Linear`s (d_in -> r without bias, r -> d_out with the original bias): they
export as two MatMuls that every runtime and quantizer already understands, with no custom op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from exporter.contracts import LayerPlan, LayerResult, RankPlan, Spectrum
from exporter.select import Factors, SelectionMethod, row_bands


class LowRankLinear(nn.Module):
    """y = second(first(x)), first: d_in -> rank, second: rank -> d_out (+ bias)."""

    def __init__(self, factors: Factors):
        super().__init__()
        rank, d_in = factors.first.shape
        d_out = factors.second.shape[0]
        self.first = nn.Linear(d_in, rank, bias=False)
        self.second = nn.Linear(rank, d_out, bias=factors.bias is not None)
        with torch.no_grad():
            self.first.weight.copy_(factors.first)
            self.second.weight.copy_(factors.second)
            if factors.bias is not None:
                self.second.bias.copy_(factors.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def relative_error(self, weight: torch.Tensor) -> float:
        """||B A - W|| / ||W|| (Frobenius, float64), a band of rows at a time: whole, the product and its float64
        copies were 1 GB at Llama-2-7B's MLP widths, the peak of a factorizing block."""
        missed = kept = 0.0
        for rows in row_bands(*weight.shape):
            band = weight[rows].double()
            missed += float((self.second.weight[rows] @ self.first.weight).double().sub_(band).square().sum())
            kept += float(band.square().sum())
        return (missed / kept) ** 0.5 if kept else 0.0


@torch.no_grad()
def factorize_(
    model: nn.Module,
    plan: RankPlan,
    method: SelectionMethod,
    stats: dict,
    on_layer: Callable[[str], None] = lambda name: None,
) -> tuple[LayerResult, ...]:
    """Mutates `model`: every layer the plan factorizes becomes a LowRankLinear chosen by `method`."""
    results = []
    for layer in plan.factorized:
        module = model.get_submodule(layer.name)
        weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach().clone()
        factors = method.select(weight, bias, stats.get(layer.name), layer.rank)
        replacement = LowRankLinear(factors)
        error = replacement.relative_error(weight)
        parent_name, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
        results.append(LayerResult(layer.name, layer.rank, min(weight.shape), float(error)))
        on_layer(layer.name)
    return tuple(results)


SPECTRUM_LAYERS = 3


def spectrum_layers(plan: RankPlan) -> set[LayerPlan]:
    """The first, a middle and the last factorized layer: those whose basis scores the report draws."""
    layers = plan.factorized
    if not layers:
        return set()
    return {layers[int(i * (len(layers) - 1) / (SPECTRUM_LAYERS - 1))] for i in range(SPECTRUM_LAYERS)}


@torch.no_grad()
def layer_spectrum(layer: LayerPlan, model: nn.Module, method: SelectionMethod, stats: dict) -> Spectrum:
    """The method's basis scores of one (still dense) layer, as fractions of their sum, and the rank kept."""
    scores = method.scores(model.get_submodule(layer.name).weight.detach(), stats.get(layer.name)).double()
    total = float(scores.sum()) or 1.0
    return Spectrum(layer.name, tuple(round(float(v) / total, 8) for v in scores), layer.rank)
