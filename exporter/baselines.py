"""Published low-rank baselines behind the selection interface, so methods can be compared at equal bytes.

Each one rescales W before the SVD so that truncation drops what matters least *for the calibration data*,
then undoes the scaling in the first factor:
- ASVD (Yuan et al. 2023): columns scaled by mean |x|^alpha of the layer's input channels.
- SVD-LLM (Wang et al. 2024): W L with L the Cholesky factor of the inputs' Gram matrix (X^T X / n = L L^T), so the
  truncation loss ||(W - W_r) X||^2 / n equals the sum of the dropped singular values squared.
- FWSVD (Hsu et al. 2022): rows scaled by the square root of their Fisher information (sum of squared gradients).
"""

from __future__ import annotations

import torch

from exporter.collect import activation_stats, gradient_passes
from exporter.errors import NumericalError
from exporter.select import Factors, SelectionMethod, register, svd

ASVD_ALPHA = 0.5
EPSILON = 1e-6


class ActivationAware(SelectionMethod):
    """Methods that learn from what enters each projection: one forward pass over the calibration data."""

    needs = "activations"

    def collect(self, model, calibration, names, advance=lambda: None, ranks=None):
        return activation_stats(model, calibration, names, advance)


@register
class ASVD(ActivationAware):
    name = "asvd"
    description = "activation-aware SVD: input channels scaled by mean |x|^0.5"

    def select(self, weight, bias, stats, rank):
        scale = _asvd_scale(stats)
        u, s, vh = svd(weight.double() * scale, cache=self.cache)
        first = (s[:rank, None] * vh[:rank]) / scale
        return Factors(first=first.to(weight.dtype), second=u[:, :rank].to(weight.dtype), bias=bias)

    def scores(self, weight, stats):
        return svd(weight.double() * _asvd_scale(stats), cache=self.cache)[1].square()


def _asvd_scale(stats) -> torch.Tensor:
    return (stats["abs_mean"] + EPSILON) ** ASVD_ALPHA  # (d_in,)


def whitening(gram: torch.Tensor, layer: str = "") -> torch.Tensor:
    """Lower-triangular L (float64) with L L^T = gram, adding the least diagonal jitter that makes it positive
    definite. Factorized in place in one float64 copy (at K = 11008, Llama-2-7B's MLP, one is 0.97 GB), through
    its column-major transpose, which LAPACK works on without copying (exporter.quantize.gptq)."""
    jitter = 0.0
    scale = float(gram.diagonal().mean()) or 1.0
    info = torch.empty((), dtype=torch.int32)
    for _ in range(8):
        factor = gram.to(torch.float64, copy=True).T
        factor.diagonal().add_(jitter * scale)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
            return factor
        jitter = max(jitter * 10, 1e-8)
    raise NumericalError(f"the calibration inputs of {layer or 'a layer'} are degenerate (Cholesky failed); "
                         "use more or more varied calibration data")


@register
class SVDLLM(ActivationAware):
    name = "svdllm"
    description = "SVD-LLM: truncation-aware whitening by the Cholesky factor of the inputs' Gram matrix"

    def select(self, weight, bias, stats, rank):
        lower = whitening(stats["gram"])
        u, s, vh = svd(weight.double() @ lower, cache=self.cache)
        # first = diag(s) V^T L^-1, solved as first @ L = diag(s) V^T (no explicit inverse)
        first = torch.linalg.solve_triangular(lower, s[:rank, None] * vh[:rank], upper=False, left=False)
        return Factors(first=first.to(weight.dtype), second=u[:, :rank].to(weight.dtype), bias=bias)

    def scores(self, weight, stats):
        # s_i^2 is exactly the output error per token that dropping basis i costs on the calibration data
        return svd(weight.double() @ whitening(stats["gram"]), cache=self.cache)[1].square()


@register
class FWSVD(SelectionMethod):
    name = "fwsvd"
    needs = "gradients"
    description = "Fisher-weighted SVD: rows scaled by the square root of their summed squared gradients"

    def collect(self, model, calibration, names, advance=lambda: None, ranks=None):
        fisher: dict[str, dict[str, torch.Tensor]] = {}

        def accumulate(name, grad):
            rows = grad.double().square().sum(1)
            entry = fisher.setdefault(name, {"row_fisher": torch.zeros_like(rows)})
            entry["row_fisher"] += rows

        gradient_passes(model, calibration, names, accumulate, advance)
        return fisher

    def select(self, weight, bias, stats, rank):
        scale = _fisher_scale(stats)
        u, s, vh = svd(scale * weight.double(), cache=self.cache)
        return Factors(first=(s[:rank, None] * vh[:rank]).to(weight.dtype),
                       second=(u[:, :rank] / scale).to(weight.dtype), bias=bias)

    def scores(self, weight, stats):
        return svd(_fisher_scale(stats) * weight.double(), cache=self.cache)[1].square()


def _fisher_scale(stats) -> torch.Tensor:
    return (stats["row_fisher"] + EPSILON * float(stats["row_fisher"].mean() or 1.0)).sqrt()[:, None]
