"""Int4 weights as onnxruntime's MatMulNBits and GatherBlockQuantized hold them, and how edgeslim chooses them.

The format (one specification for the graph and for its PyTorch mirror): a weight W (N x K, y = W x) is cut along K
into blocks of `QUANT_BLOCK`; each block of each row has an fp32 scale and a 4-bit zero point, and each weight is an
integer q in 0..15 with value (q - zero) * scale. K is padded to whole blocks (padding holds q = zero, value 0), so
a rank-8 factor costs as much as rank 32.

Two ways to choose q, scale and zero:
- `round_to_nearest`: each block's range (widened to include 0) on 16 levels, each weight rounded alone, exactly as
  onnxruntime's own quantizer does (tests/test_quantize.py checks byte for byte);
- `gptq`: the same grid, but weights are rounded one input channel at a time and the rounding error of each is
  pushed onto the channels not yet rounded, weighted by the calibration inputs' Gram matrix (GPTQ, Frantar et al.
  2022), so the layer's *output* error on the target data is what is minimised, not each weight's own.
`Int4Matrix.dequantize` gives the values the runtime computes with; the shipped graph and the PyTorch mirror that
parity is checked against are both built from the same `Int4Matrix`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import lapack
from torch import nn

from exporter.collect import GramOnDisk
from exporter.factorize import LowRankLinear
from exporter.select import transposed_product
from exporter.vocabulary import PrunedHead

QUANT_BLOCK = 32
LEVELS = 15  # 4 bits: q in 0..15
GPTQ_DAMPING = 0.01  # of the Gram matrix's mean diagonal, added for a stable inverse (the GPTQ paper's default)
ELEMENTS_AT_ONCE = 1 << 24  # rows are rounded independently, so a few at a time: 64 MB of fp32 a temporary


def rows_at_once(cols: int) -> int:
    """Rows of `cols` columns to round (or dequantize) together: a 150k-row lm_head would be 0.5 GB a copy, and
    a Llama-2-7B down projection's temporaries 1 GB at once."""
    return max(1, ELEMENTS_AT_ONCE // cols)


@dataclass
class Int4Matrix:
    """Levels q (0..15, N x K_padded) packed two a byte as MatMulNBits reads them, the even column's in the low
    nibble (`packed`: N x K_padded / 2; a byte a level would double a 128k-row table's 0.2 GB), scale and zero
    (N x blocks): W[n, k] = (q - zero[block]) * scale[block]."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    k: int  # the real K, before padding

    @classmethod
    def from_levels(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int) -> Int4Matrix:
        return cls(_two_a_byte(q), scale.float(), zero.to(torch.uint8), k)

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def blocks(self) -> int:
        return self.scale.shape[1]

    def levels(self) -> torch.Tensor:
        """q, unpacked: (N x K_padded) uint8 0..15."""
        return torch.stack([self.packed & 15, self.packed >> 4], dim=-1).view(self.n, -1)

    def dequantize(self) -> torch.Tensor:
        """(N x K) float32, computed as the runtime computes it: (q - zero) * scale."""
        levels = (self.levels().float().view(self.n, self.blocks, QUANT_BLOCK) - self.zero.float()[..., None])
        return (levels * self.scale[..., None]).view(self.n, -1)[:, : self.k]

    def packed_weights(self) -> np.ndarray:
        """(N, blocks, QUANT_BLOCK / 2) uint8, as the graph stores them."""
        return self.packed.view(self.n, self.blocks, QUANT_BLOCK // 2).numpy()

    def packed_zero_points(self) -> np.ndarray:
        """(N, ceil(blocks / 2)) uint8, two zero points a byte, the even block's in the low nibble."""
        return _two_a_byte(nn.functional.pad(self.zero, (0, self.blocks % 2))).numpy()

    def rows(self, start: int, end: int) -> Int4Matrix:
        return Int4Matrix(self.packed[start:end], self.scale[start:end], self.zero[start:end], self.k)

    def nbytes(self) -> int:
        return self.n * (self.blocks * (QUANT_BLOCK // 2 + 4) + (self.blocks + 1) // 2)


def _two_a_byte(levels: torch.Tensor) -> torch.Tensor:
    """(N x 2M) levels 0..15 as (N x M) uint8, the even column's in the low nibble: MatMulNBits' layout for weights
    and zero points."""
    levels = levels.to(torch.uint8)
    return levels[:, 0::2] | (levels[:, 1::2] << 4)


def int4_bytes(n: int, k: int) -> int:
    """Bytes of an N x K weight at int4, padding and per-block scales and zero points included."""
    blocks = -(-k // QUANT_BLOCK)
    return n * (blocks * (QUANT_BLOCK // 2 + 4) + (blocks + 1) // 2)


def _grid(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per block of float32 values (..., QUANT_BLOCK), onnxruntime's choice: the block's range
    widened to include 0, on 16 levels; zero = roundf(-min / scale)."""
    low = blocks.amin(-1).clamp(max=0)
    high = blocks.amax(-1).clamp(min=0)
    scale = (high - low) / LEVELS
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = _round_half_away(-low / safe).clamp(0, LEVELS)
    return scale, zero


def _padded_blocks(weight: torch.Tensor) -> torch.Tensor:
    """(N, blocks, QUANT_BLOCK) float32; a partial last block is padded with the row's last value, which leaves
    its min and max, and so its grid, as they are."""
    rows, cols = weight.shape
    pad = (-cols) % QUANT_BLOCK
    weight = weight.float()
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(rows, pad)], dim=1)
    return weight.reshape(rows, -1, QUANT_BLOCK)


def round_to_nearest(weight: torch.Tensor) -> Int4Matrix:
    """Every weight rounded alone to its block's grid, as onnxruntime's MatMulNBits quantizer does (C's roundf of
    x * (1 / scale) + zero, halves away from zero). A quarter of the usual rows at a time: a piece's temporaries
    are four times its size (a Llama-2-7B block's reference rounding held 0.4 GB of them)."""
    return _by_rows(weight, _nearest, rows_at_once(4 * weight.shape[1]))


def _nearest(weight: torch.Tensor) -> Int4Matrix:
    blocks = _padded_blocks(weight)
    scale, zero = _grid(blocks)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    x = blocks * (1 / safe)[..., None]
    x.add_(zero[..., None])
    return _finish(_round_half_away(x).clamp_(0, LEVELS), scale, zero, weight.shape[1])


def gptq(weight: torch.Tensor, gram: torch.Tensor, rows: int | None = None) -> Int4Matrix:
    """Error-compensating rounding on the same grid: minimises ||(W - Q) X||^2 for inputs with Gram matrix `gram`
    (X^T X / n, K x K). Input channels are rounded in order; each one's error, scaled by the inverse Hessian's
    Cholesky factor, is subtracted from the channels after it. A block's grid is fixed from the (already
    compensated) weights when rounding reaches it, as GPTQ with groups does. Rows never mix: they are rounded
    `rows` at a time (by default `rows_at_once`)."""
    return gptq_sharing([weight], gram, rows)[0]


def gptq_sharing(weights: list[torch.Tensor], gram: torch.Tensor, rows: int | None = None,
                 consume: bool = False) -> list[Int4Matrix]:
    """`gptq` of matrices that read the same inputs (q/k/v, gate/up): one inverse for all, and no stacked copy.
    `consume`: the Gram matrix's memory is handed back while the inverse is made (it is empty after)."""
    dead = gram.diagonal() == 0  # inputs that are always zero: their weights do not matter
    factor = _inverse_factor(gram, consume)
    return [_by_rows(weight, lambda piece: _gptq_rows(piece, factor, dead), rows) for weight in weights]


def _inverse_factor(gram: torch.Tensor, consume: bool = False) -> torch.Tensor:
    """GPTQ's error weights: U, the upper Cholesky factor of the damped inverse Hessian (H^-1 = U^T U), held as
    P U P (P reverses the order; `_factor_rows` reads U's rows from it).

    GPTQ's reference computes U as the Cholesky factor of H, inverted, then factorized again: 4/3 K^3 flops. With
    P H P = L L^T, H = (P L P)(P L P)^T and P L P is upper, so U = (P L P)^-1 = P L^-1 P: one Cholesky and one
    triangular inverse, 2/3 K^3 (Llama-2-7B's 11008-wide MLP input: 16 s here instead of 38). In float64, in place
    in one K x K matrix (0.97 GB at K = 11008, no copy beside it): LAPACK works on column-major matrices, and the
    transpose of this row-major one is column-major and the same matrix while symmetric. torch has no triangular
    inverse (LAPACK's trtri): scipy's runs on the same memory.

    `consume`: the float32 Gram matrix is freed once copied, before the float64 one is filled: P H P is first
    written in float32 into the second half of the float64 matrix's memory (its first half untouched, so not yet
    resident), then widened in place, first element first. At K = 11008 the two matrices never hold more than the
    float64 one's 0.97 GB, instead of 1.45 GB."""
    size = len(gram)
    factor = torch.empty(size, size, dtype=torch.float64)
    staged = factor.view(-1).view(torch.float32)[size * size:].view(size, size)
    step = rows_at_once(size)
    for start in range(0, size, step):  # P H P, a few rows at a time: torch.flip copies the whole matrix
        end = min(start + step, size)
        staged[size - end:size - start] = gram[start:end].flip(0, 1)
    if consume:
        gram.untyped_storage().resize_(0)
    wide, narrow, chunk = factor.view(-1), staged.view(-1), ELEMENTS_AT_ONCE // 8  # a 16 MiB temporary
    for start in range(0, size * size, chunk):  # element i's 8 bytes hold float32 elements before i only
        wide[start:start + chunk] = narrow[start:start + chunk].double()
    diagonal = factor.diagonal()
    diagonal[diagonal == 0] = 1
    diagonal.add_(GPTQ_DAMPING * float(diagonal.mean()))
    column_major = factor.T
    torch.linalg.cholesky(column_major, out=column_major)  # P H P = L L^T, L in the lower triangle
    _, info = lapack.dtrtri(column_major.numpy(), lower=1, overwrite_c=1)  # L^-1, in place
    if info != 0:
        raise RuntimeError(f"GPTQ: the inverse of a Cholesky factor failed (LAPACK trtri info {info})")
    return column_major


def _factor_rows(factor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start..end of U, in float32, from `_inverse_factor`'s P U P."""
    size = len(factor)
    return factor[size - end:size - start].flip(0, 1).float()


def _gptq_rows(weight: torch.Tensor, factor: torch.Tensor, dead: torch.Tensor) -> Int4Matrix:
    """GPTQ's column loop for some rows."""
    rows, cols = weight.shape
    w = weight.float().clone()
    w[:, dead] = 0
    blocks = -(-cols // QUANT_BLOCK)
    q = torch.zeros(rows, blocks * QUANT_BLOCK, dtype=torch.uint8)
    scales, zeros = torch.zeros(rows, blocks), torch.zeros(rows, blocks)
    for b in range(blocks):
        start, end = b * QUANT_BLOCK, min((b + 1) * QUANT_BLOCK, cols)
        scale, zero = _grid(_padded_blocks(w[:, start:end].float())[:, 0])
        scales[:, b], zeros[:, b] = scale, zero
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        chunk, errors = w[:, start:end].clone(), torch.zeros(rows, end - start)
        band = _factor_rows(factor, start, end)
        local = band[:, start:end]
        for i in range(end - start):
            level = torch.round(chunk[:, i] / safe + zero).clamp(0, LEVELS)
            error = (chunk[:, i] - (level - zero) * scale) / local[i, i]
            chunk[:, i:] -= error[:, None] * local[i, i:][None]
            errors[:, i], q[:, start + i] = error, level.to(torch.uint8)
        w[:, end:].addmm_(errors, band[:, end:], alpha=-1)  # in place: a temporary would be 4x slower here
        if end - start < QUANT_BLOCK:  # padding holds the zero point: value 0
            q[:, end:] = zero[:, None].to(torch.uint8)
    return Int4Matrix.from_levels(q, scales, zeros, cols)


def _by_rows(weight: torch.Tensor, round_rows: Callable[[torch.Tensor], Int4Matrix],
             rows: int | None = None) -> Int4Matrix:
    """`weight` rounded `rows` rows at a time (by default `rows_at_once`), each piece copied into the result as it
    is made: concatenating the pieces at the end would hold the matrix twice (0.5 GB for a 128k-row table)."""
    n, k = weight.shape
    blocks = -(-k // QUANT_BLOCK)
    whole = Int4Matrix(torch.empty(n, blocks * QUANT_BLOCK // 2, dtype=torch.uint8), torch.empty(n, blocks),
                       torch.empty(n, blocks, dtype=torch.uint8), k)
    step = rows or rows_at_once(k)
    for first in range(0, n, step):
        piece = round_rows(weight[first:first + step])
        for part, into in ((piece.packed, whole.packed), (piece.scale, whole.scale), (piece.zero, whole.zero)):
            into[first:first + piece.n] = part
    return whole


def quantize_model(model: nn.Module, stats: dict | None = None) -> dict[str, Int4Matrix]:
    """Every weight matrix the graph holds, at int4, keyed by module path: each Linear of the blocks (both factors of
    a factorized one), the lm_head, and the embedding table when it is not tied to the lm_head.

    With `stats` (per-layer input Gram matrices, exporter.collect.activation_stats over every projection and the
    lm_head) weights are rounded by GPTQ; without, to nearest (`quantize_modules`)."""
    return {**quantize_modules(model, stats), **untied_embedding(model)}


def untied_embedding(model: nn.Module) -> dict[str, Int4Matrix]:
    """The embedding table rounded to nearest (a lookup: no inputs to weigh errors by), unless it is the lm_head's."""
    embedding = model.get_input_embeddings()
    if embedding.weight is model.get_output_embeddings().weight:
        return {}
    path = next(name for name, module in model.named_modules() if module is embedding)
    return {path: round_to_nearest(embedding.weight.detach())}


def quantize_modules(root: nn.Module, stats: dict | None = None, prefix: str = "",
                     consume: bool = False) -> dict[str, Int4Matrix]:
    """The Linear layers under `root` (whose path in the model is `prefix`: a streamed export rounds one block at a
    time) at int4, keyed by their paths in the model; `stats` is keyed by those paths too.

    `consume` (a streamed block, whose statistics and fp32 weights are not needed once it is rounded; its Gram
    matrices on disk, `exporter.collect.grams_on_disk`, so that each read is the reader's own): each Gram matrix
    read is used up by its inverse and the layer taken out of `stats`, and each rounded layer's weights are dropped
    (left on the meta device; `apply_` writes it back dequantized). So Llama-2-7B's widest inverse, the last, is
    made beside neither a Gram matrix nor the block's other weights (0.8 GB at that width).

    A factorized layer y = B (A x) is rounded in two steps: A by GPTQ on the layer's inputs; then B refitted to
    what A's rounding changed (least squares: the B that best reproduces the unrounded layer's output from the
    rounded A x) and rounded by GPTQ on the Gram matrix of A x, which follows from the layer's own (Â G Âᵀ). So
    the factors' errors do not compound."""
    if consume and (stats is None or not all(isinstance(entry, GramOnDisk) for entry in stats.values())):
        raise ValueError("consume reads each Gram matrix from disk: pass exporter.collect.grams_on_disk(stats)")
    quantized: dict[str, Int4Matrix] = {}
    inside_low_rank = set()
    reading: dict[int, list[str]] = {}  # dense layers by their inputs' statistics (q/k/v share one entry)
    modules = {".".join(filter(None, (prefix, name))): module for name, module in root.named_modules()}
    for name, module in modules.items():
        if isinstance(module, LowRankLinear):
            inside_low_rank |= {f"{name}.first", f"{name}.second"}
            quantized.update(_quantize_low_rank(name, module, None if stats is None else stats[name], consume))
            if consume:
                del stats[name]
                _drop_weights(module.first, module.second)
        elif isinstance(module, nn.Linear | PrunedHead) and name not in inside_low_rank:
            if stats is None:
                quantized[name] = round_to_nearest(module.weight.detach())
            else:
                reading.setdefault(id(stats[name]), []).append(name)
    for names in reading.values():  # layers reading one input share one inverse
        rounded = gptq_sharing([modules[name].weight.detach() for name in names], stats[names[0]]["gram"],
                               consume=consume)
        quantized.update(zip(names, rounded, strict=True))
        if consume:
            for name in names:
                del stats[name]
            _drop_weights(*(modules[name] for name in names))
    return quantized


def _drop_weights(*linears: nn.Module) -> None:
    """Each rounded layer's weight left on the meta device (`apply_` writes it back dequantized)."""
    for linear in linears:
        linear.weight = nn.Parameter(linear.weight.to("meta"), requires_grad=linear.weight.requires_grad)


def _quantize_low_rank(name: str, layer: LowRankLinear, stats: Mapping[str, torch.Tensor] | None,
                       consume: bool = False) -> dict[str, Int4Matrix]:
    """`consume`: the Gram matrix read for GPTQ is used up by its float64 inverse, and read again for the refit
    (at Llama-2-7B's down_proj 0.49 GB that would sit beside the 0.97 GB inverse)."""
    first, second = layer.first.weight.detach(), layer.second.weight.detach()
    if stats is None:
        return {f"{name}.first": round_to_nearest(first), f"{name}.second": round_to_nearest(second)}
    first_q = gptq_sharing([first], stats["gram"], consume=consume)[0]
    return _refit_second(name, first, second, first_q, stats["gram"])


def _refit_second(name: str, first: torch.Tensor, second: torch.Tensor, first_q: Int4Matrix,
                  gram: torch.Tensor) -> dict[str, Int4Matrix]:
    """B refitted to what rounding A changed, then rounded by GPTQ on the rounded A's outputs. Products in float64
    a band at a time: no float64 copy of G (0.97 GB at Llama-2-7B's 11008-wide MLP input), A or Â."""
    rounded = first_q.dequantize()  # exact in float32: levels times scales
    toward_rounded = transposed_product(gram, rounded.T)  # G Âᵀ (G symmetric)
    inner = transposed_product(rounded.T, toward_rounded)  # Â G Âᵀ: the Gram matrix of the rounded A's outputs
    damping = GPTQ_DAMPING * float(inner.diagonal().mean()) * torch.eye(inner.shape[0], dtype=inner.dtype)
    target = second.double() @ transposed_product(first.T, toward_rounded)  # B A G Âᵀ, never d_out x K
    refit = torch.linalg.solve(inner + damping, target.T).T
    return {f"{name}.first": first_q, f"{name}.second": gptq(refit, inner)}


@torch.no_grad()
def apply_(model: nn.Module, quantized: dict[str, Int4Matrix]) -> nn.Module:
    """Mutates `model`: every quantized weight replaced by its dequantized value, so PyTorch computes what the
    int4 graph computes (the mirror that the shipped graph's parity is checked against). A tied embedding follows
    its lm_head: they share one tensor. A weight that rounding dropped (`quantize_modules(consume=True)`) is made
    again."""
    for name, matrix in quantized.items():
        module = model.get_submodule(name)
        if module.weight.is_meta:
            module.weight = nn.Parameter(torch.empty_like(module.weight, device="cpu"),
                                         requires_grad=module.weight.requires_grad)
        weight = module.weight
        rows = rows_at_once(matrix.k)
        for start in range(0, matrix.n, rows):  # a few rows at a time: no full-size temporaries
            weight[start:start + rows].copy_(matrix.rows(start, start + rows).dequantize())
    return model


def _finish(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int) -> Int4Matrix:
    rows = q.shape[0]
    q = q.reshape(rows, -1)
    q[:, k:] = zero.repeat_interleave(QUANT_BLOCK, dim=1)[:, k:]  # padding holds the zero point: value 0
    return Int4Matrix.from_levels(q, scale, zero, k)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: to the nearest integer, halves away from zero (torch.round sends halves to even). A fraction
    has its number's sign, so the step away from zero is the fraction's sign where it is at least a half."""
    whole = torch.trunc(x)
    fraction = x - whole
    step = torch.sign(fraction)
    step.mul_(fraction.abs_() >= 0.5)
    return whole.add_(step)
