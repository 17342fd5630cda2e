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

from exporter.cache import TensorCache
from exporter.collect import activation_stats, gradient_passes
from exporter.errors import NumericalError
from exporter.select import (
    Factors,
    SelectionMethod,
    divisor,
    eigen_decomposition,
    register,
    row_bands,
    svd,
    transposed_product,
)

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


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor, layer: str = "",
                 cache: TensorCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """U and s (float64) of the whitened matrix W L = U diag(s) V^T, L L^T = gram: the bases SVD-LLM, the
    whitened importance methods and the layer prices share. U and s are all anyone needs: since U^T W L =
    diag(s) V^T, the first factor diag(s) V^T L^-1 of any kept set of bases is just U^T W.

    A wide or square W (d_out <= d_in, every projection but the MLP's up-projections) is decomposed through the
    d_out x d_out matrix W gram W^T = (W L)(W L)^T, so no d_in x d_in float64 matrix is ever formed: at Llama-2-7B's
    down_proj (d_in 11008) the Cholesky factor alone was 0.97 GB, W L and V^T 0.36 GB each. Needing no Cholesky,
    it also needs no jitter for a singular gram. A tall W has the smaller side on its input: L is small there."""

    def compute() -> dict[str, torch.Tensor]:
        if weight.shape[0] > weight.shape[1]:
            return _tall_whitened(weight.detach(), gram, layer)
        return eigen_decomposition(_sandwich(weight.detach(), gram), layer)

    result = (cache or TensorCache(None)).get_or_compute(("whitened", weight, gram), compute)
    return result["u"], result["s"]


def whitened_bases(weight: torch.Tensor, gram: torch.Tensor, layer: str = "",
                   cache: TensorCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, s and the rows V^T L^-1 = diag(1/s) U^T W (float64): W = U diag(s) (V^T L^-1), basis by basis."""
    u, s = whitened_svd(weight, gram, layer, cache)
    return u, s, transposed_product(u, weight.detach()).div_(divisor(s)[:, None])


def projection_factors(kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Factors:
    """Factors keeping the whitened bases `kept` (columns of U): first = diag(s) V^T L^-1 = U^T W, second = U."""
    return Factors(first=transposed_product(kept, weight).to(weight.dtype), second=kept.to(weight.dtype), bias=bias)


def _sandwich(left: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    """left @ middle @ left^T (middle symmetric) in float64, a band of middle's rows at a time, each band's product
    with left^T itself taken in bands: neither is copied whole to float64 (at Llama-2-7B's down_proj a float64 W
    was 0.36 GB of the block stage's peak)."""
    transposed = left.T
    product = torch.zeros(left.shape[0], left.shape[0], dtype=torch.float64)
    for rows in row_bands(*middle.shape):
        product.addmm_(transposed[rows].double().T, transposed_product(middle[rows].T, transposed))
    return product


def _tall_whitened(weight: torch.Tensor, gram: torch.Tensor, layer: str) -> dict[str, torch.Tensor]:
    """U and s of W L for a tall W (d_out > d_in, an MLP's up-projection): V and s from the d_in x d_in matrix
    (W L)^T (W L) = L^T (W^T W) L, then U = W (L V / s) a band of rows at a time, so neither W L nor a float64 W
    is held whole beside U (0.36 GB each at Llama-2-7B's 11008 x 4096, whose pricing, `layer_costs`, then
    needs 815 MiB instead of 1,059)."""
    lower = whitening(gram, layer)
    rows_gram = transposed_product(weight, weight)  # W^T W
    right = eigen_decomposition(_sandwich(lower.T, rows_gram), layer)
    del rows_gram
    mapping = (lower @ right.pop("u")).div_(divisor(right["s"]))  # L V / s
    del lower
    u = torch.empty(weight.shape, dtype=torch.float64)
    for rows in row_bands(*weight.shape):
        u[rows] = weight[rows].double() @ mapping
    return {"u": u, "s": right["s"]}


@register
class SVDLLM(ActivationAware):
    name = "svdllm"
    description = "SVD-LLM: truncation-aware whitening by the Cholesky factor of the inputs' Gram matrix"

    def select(self, weight, bias, stats, rank):
        u, _ = whitened_svd(weight, stats["gram"], cache=self.cache)
        return projection_factors(u[:, :rank], weight, bias)

    def scores(self, weight, stats):
        # s_i^2 is exactly the output error per token that dropping basis i costs on the calibration data
        return whitened_svd(weight, stats["gram"], cache=self.cache)[1].square()


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
