"""Weight quantization of the shipped graph, and its exact mirror in PyTorch.

The graph is quantized by onnxruntime's MatMulNBits quantizer (round-to-nearest, asymmetric, blocks of
`QUANT_BLOCK` along the reduction axis, fp32 scale and integer zero point per block). `fake_quantize_` applies the
same arithmetic to a PyTorch model's weights, so the shipped int4 graph can be checked for exact parity the
way the fp32 graph is: a quantized model cannot match the unquantized one token for token, but it must match
itself. Keep the two functions side by side: they are one specification.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

BITS = {"fp32": 32, "int4": 4}
QUANT_BLOCK = 32


QUANTIZED_OPS = ("MatMul", "Gather")  # every constant MatMul weight and the embedding table


def quantize_graph(reference: Path, precision: str) -> onnx.ModelProto:
    """The fp32 graph at `precision`: every constant MatMul weight and the embedding table quantized."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(reference)),
        bits=BITS[precision],
        block_size=QUANT_BLOCK,
        is_symmetric=False,
        op_types_to_quantize=QUANTIZED_OPS,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantizer logs every node it visits
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: handled, but numpy warns
            quantizer.process()
    finally:
        logging.disable(previous)
    return quantizer.model.model


def round_trip(weight: torch.Tensor, bits: int, rounding: str = "mlas") -> torch.Tensor:
    """Quantize and dequantize rows of `weight` in blocks of QUANT_BLOCK along the last axis, in float32 exactly
    as onnxruntime does. The block's range is widened to include 0 and scale = range / (2^bits - 1). The two
    quantizer paths differ only in rounding:
    - "mlas" (MatMul weights, C++): zp = roundf(-min / scale), q = roundf(x * (1 / scale) + zp), halves away
      from zero;
    - "numpy" (embedding tables, Python): zp = round(-min / scale), q = round(x / scale + zp), halves to even.
    """
    rows, cols = weight.shape
    levels = 2**bits - 1
    blocks = weight.float().reshape(rows, -1) if cols % QUANT_BLOCK == 0 else None
    if blocks is None:  # the last block is partial: pad it with its own first value, which leaves min/max as is
        pad = (-cols) % QUANT_BLOCK
        padded = torch.cat([weight.float(), weight.float()[:, -1:].expand(rows, pad)], dim=1)
        blocks = padded.reshape(rows, -1, QUANT_BLOCK)
    else:
        blocks = blocks.reshape(rows, -1, QUANT_BLOCK)
    low = blocks.amin(-1, keepdim=True).clamp(max=0)
    high = blocks.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / levels
    zero_scale = scale == 0
    safe = torch.where(zero_scale, torch.ones_like(scale), scale)
    if rounding == "mlas":
        zero = _round_half_away(-low / safe).clamp(0, levels)
        q = _round_half_away(blocks * (1 / safe) + zero).clamp(0, levels)
    else:
        zero = torch.round(-low / safe).clamp(0, levels)
        q = torch.round(blocks / safe + zero).clamp(0, levels)
    out = torch.where(zero_scale, torch.zeros_like(blocks), (q - zero) * scale)
    return out.reshape(rows, -1)[:, :cols].to(weight.dtype)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: to the nearest integer, halves away from zero (torch.round sends halves to even)."""
    whole = torch.trunc(x)
    return whole + torch.where((x - whole).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


@torch.no_grad()
def fake_quantize_(model: nn.Module, precision: str) -> nn.Module:
    """Mutates `model`: every Linear weight and embedding table replaced by its quantized value.

    A Linear's weight (d_out x d_in) is the transpose of the graph's MatMul weight (K=d_in x N=d_out), so its
    rows are the graph's blocks along K; an embedding (vocab x hidden) is quantized along hidden likewise. A tied
    lm_head is untied first: the graph holds it as a separate MatMul weight (see export.fold_transposed_...).
    """
    bits = BITS[precision]
    if bits == 32:
        return model
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.clone())  # the graph stores a tied head as its own MatMul weight
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(round_trip(module.weight, bits, "mlas"))
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(round_trip(module.weight, bits, "numpy"))
    return model
