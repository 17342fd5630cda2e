"""Basis selection: which rank-1 bases u_i v_i^T of each W = U diag(s) V^T a layer keeps.

A method is a class registered with `@register`. It declares what data it needs (`needs`: nothing, activations,
gradients, training through the whole model, or blocks: a decoder block's own inputs and outputs), so the pipeline
runs the right calibration pass, and has three parts:
- `collect(model, calibration, names, ...)`: statistics per layer from the target application's data (hooks that
  remove themselves; the training-based method relearns here). Methods that need nothing return {}. When the
  export runs a block at a time, `collect_block` takes its place, per block.
- `select(weight, bias, stats, rank)`: pure linear algebra on one matrix, returning the two factors.
- `scores(weight, stats)`: what each basis is worth, in keeping order, for the budget-driven allocation.
Built-in methods: `svd` here, `asvd`/`svdllm`/`fwsvd` in baselines.py, `taylor` in importance.py, `basel` and
`basel-layerwise` in relearn.py. A numerical failure raises NumericalError naming the layer; nothing is ever
silently replaced.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from exporter.cache import TensorCache
from exporter.calibration import Calibration
from exporter.errors import NumericalError, UsageError

Needs = Literal["nothing", "activations", "gradients", "training", "blocks"]
BAND_ENTRIES = 1 << 22  # entries of a band of rows worked on at once (32 MB in float64)


@dataclass
class Factors:
    """W ~= second @ first: `first` (rank x d_in) = diag(s) V^T, `second` (d_out x rank) = U."""

    first: torch.Tensor
    second: torch.Tensor
    bias: torch.Tensor | None

    @property
    def rank(self) -> int:
        return self.first.shape[0]


class SelectionMethod(ABC):
    name: ClassVar[str]
    needs: ClassVar[Needs]
    description: ClassVar[str]

    passes: ClassVar[int] = 1  # passes over the calibration data that `collect` makes (for progress bars)

    def __init__(self, cache: TensorCache | None = None):
        self.cache = cache or TensorCache(None)

    def collect(
        self,
        model: nn.Module,
        calibration: Calibration,
        names: list[str],
        advance: Callable[[], None] = lambda: None,
        ranks: dict[str, int] | None = None,
    ) -> dict:
        """Statistics per layer name (`advance` is called once per batch and pass); none by default. `ranks`
        (the plan's) matters only to methods that prune while they train."""
        return {}

    def collect_block(self, model: nn.Module, block: nn.Module, inputs: list, outputs: list, stats: dict,
                      ranks: dict[str, int]) -> dict:
        """Statistics per layer of one decoder block, when exporting a block at a time (exporter.stream):
        `inputs` and `outputs` are the dense block's calibration pieces (hidden states and the block's other
        arguments), `stats` the InputStats of its projections, `ranks` the planned ranks of those it factorizes.
        By default the input statistics, which are all the activation methods read."""
        return stats

    @abstractmethod
    def select(self, weight: torch.Tensor, bias: torch.Tensor | None, stats: Any, rank: int) -> Factors:
        """Factors of rank `rank` for W (d_out x d_in)."""

    @abstractmethod
    def scores(self, weight: torch.Tensor, stats: Any) -> torch.Tensor:
        """What keeping each basis is worth, in the order `select` keeps them (so non-increasing): the
        budget-driven allocation (plan.allocate) compares these across layers."""


_REGISTRY: dict[str, type[SelectionMethod]] = {}


def register(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def _register_builtin_methods() -> None:
    """The data-aware methods live in their own modules, which register themselves when imported."""
    from exporter import baselines, importance, relearn  # noqa: F401


def get_method(name: str, cache: TensorCache | None = None) -> SelectionMethod:
    _register_builtin_methods()
    try:
        return _REGISTRY[name](cache)
    except KeyError:
        raise UsageError(f"--method {name}: unknown method; choose one of {', '.join(sorted(_REGISTRY))}") from None


def method_names() -> list[str]:
    _register_builtin_methods()
    return sorted(_REGISTRY)


@contextmanager
def single_thread() -> Iterator[None]:
    """Torch and scipy's BLAS on one thread for a while: an SVD on 2 threads of a busy machine can be 40x slower
    than on one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


def svd(
    weight: torch.Tensor, layer: str = "", cache: TensorCache | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, s, V^T of W (thin), in float64: fp32 loses the small singular values that truncation compares.

    Computed from the eigendecomposition of the smaller Gram matrix (W W^T or W^T W), not by LAPACK's SVD: at a
    7B model's widths (4096 x 11008) that is 5x faster (48 s against 246 on one core, beside another export) and
    needs no LAPACK workspace beside the result."""

    def compute() -> dict[str, torch.Tensor]:
        w = weight.detach().double()
        if w.shape[0] <= w.shape[1]:  # wide: the eigenvectors of W W^T are U
            result = eigen_decomposition(w @ w.T, layer)
            result["vh"] = (result["u"].T @ w).div_(divisor(result["s"])[:, None])  # diag(s) V^T = U^T W
        else:  # tall: the eigenvectors of W^T W are V
            right = eigen_decomposition(w.T @ w, layer)
            result = {"u": (w @ right["u"]).div_(divisor(right["s"])), "s": right["s"], "vh": right["u"].T.contiguous()}
        return result

    result = (cache or TensorCache(None)).get_or_compute(("svd", weight), compute)
    return result["u"], result["s"], result["vh"]


def eigen_decomposition(square: torch.Tensor, layer: str = "") -> dict[str, torch.Tensor]:
    """For a symmetric positive semi-definite A = X X^T (float64, destroyed: it is LAPACK's workspace): the
    singular values "s" of X, descending, and the left singular vectors "u" of X, A's eigenvectors. Squaring costs
    accuracy only far down the spectrum: a singular value s_i is exact to about 1e-16 (s_1 / s_i)^2 relative,
    1e-10 a thousand times below the largest, far finer than any truncation decision.

    LAPACK's MRRR driver (syevr) on -A in place, whose ascending order is A's descending one: only the
    eigenvectors are new memory (at 4096, 131 MiB above A against 267 for torch.linalg.eigh and the flip to
    descending order, and 11 s against 16 on one core)."""
    if not torch.isfinite(square).all():  # LAPACK, told not to check, would return numbers
        raise NumericalError(f"SVD of {layer or 'a layer'} met non-finite values; check the weights")
    column_major = square.neg_().numpy().T  # the same symmetric matrix, in the order LAPACK works in
    try:
        eigenvalues, vectors = scipy.linalg.eigh(column_major, driver="evr", overwrite_a=True, check_finite=False)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise NumericalError(f"SVD of {layer or 'a layer'} failed: {str(exc).splitlines()[0]}") from None
    s = torch.from_numpy(-eigenvalues).clamp_min(0).sqrt()
    return {"u": torch.from_numpy(vectors), "s": s}


def row_bands(rows: int, width: int) -> Iterator[slice]:
    """Slices of a (rows x width) matrix's rows of at most BAND_ENTRIES entries each, to work on in turn."""
    step = max(1, BAND_ENTRIES // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, start + step)


def transposed_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left^T @ right in float64, summed over bands of their (shared) rows, each band at most BAND_ENTRIES of the
    wider one: neither is copied whole to float64 (a 4096 x 11008 weight is 0.36 GB in float64)."""
    product = torch.zeros(left.shape[1], right.shape[1], dtype=torch.float64)
    for rows in row_bands(right.shape[0], max(left.shape[1], right.shape[1])):
        product.addmm_(left[rows].double().T, right[rows].double())
    return product


def divisor(s: torch.Tensor) -> torch.Tensor:
    """s with zeros replaced by ones: dividing by it leaves a basis of zero weight at zero."""
    return torch.where(s > 0, s, 1.0)


def keep_top(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, bias, rank: int, dtype) -> Factors:
    """Factors from the first `rank` bases of an SVD."""
    first = s[:rank, None] * vh[:rank]
    return Factors(first=first.to(dtype), second=u[:, :rank].to(dtype), bias=bias)


@register
class TruncatedSVD(SelectionMethod):
    """Keep the bases with the largest singular values: optimal for W itself, blind to the target data."""

    name = "svd"
    needs = "nothing"
    description = "plain truncated SVD (keeps the largest singular values)"

    def select(self, weight, bias, stats, rank):
        u, s, vh = svd(weight, cache=self.cache)
        return keep_top(u, s, vh, bias, rank, weight.dtype)

    def scores(self, weight, stats):
        return svd(weight, cache=self.cache)[1].square()  # each basis's share of ||W||_F^2
