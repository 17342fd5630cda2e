"""The planner: per-layer ranks that make the model fit a device profile, and what that plan will cost there.

The cost model is a roofline, deliberately simple so its assumptions can be read off:
- weights: every MatMul weight (projections, lm_head) and the embedding table at the profile's precision (int4 as
  onnxruntime's block-quantized MatMulNBits / GatherBlockQuantized: half a byte a weight plus an fp32 scale and a
  4-bit zero point per block of 32); norms and biases in fp32;
- KV cache: fp32 keys and values for `context_length` tokens, twice: a decode step holds the past it reads and
  the present it writes (the graph does not share their buffers);
- workspace: activations of a `prefill_tokens` prompt (the graph computes logits for the last position only)
  plus a fixed allowance for the runtime itself, calibrated against onnxruntime on CPU
  (`RUNTIME_OVERHEAD_BYTES`). The sum is an upper bound: it assumes a prompt arrives while the cache is full.
- latency: max(bytes moved / bandwidth, FLOPs / compute) + graph nodes x per-node overhead. Decode moves every
  MatMul weight once per token and reads the KV cache; prefill does 2 FLOPs per weight per prompt token plus
  attention. The per-node term matters for small models: SmolLM2-135M's graph has ~2,250 nodes, and at ~5 µs a
  node onnxruntime spends more time dispatching than computing a decode step on a desktop CPU.

Allocation: one keep ratio `a` for every projection (rank = a x break-even rank, rounded to a multiple of 8); the
largest `a` that meets every budget wins. A layer whose rank would reach its break-even rank stays dense.
"""

from __future__ import annotations

from collections.abc import Sequence

from exporter.contracts import MIB, DeviceProfile, LayerPlan, ModelSpec, Prediction, RankPlan
from exporter.errors import BudgetError, UsageError
from exporter.quantize import BITS, QUANT_BLOCK

# onnxruntime's own allocations beyond weights, KV cache and activations (arena, graph, kernels' scratch),
# measured as peak RSS above the baseline of a process that has imported onnxruntime; see README "Cost model".
RUNTIME_OVERHEAD_BYTES = 24 * MIB
_SEARCH_STEPS = 40
# nodes of an exported decoder block (Llama family, torch.onnx dynamo export, counted: 2,248 nodes for 30 blocks)
GRAPH_NODES_PER_BLOCK = 75


def bytes_per_weight(precision: str) -> float:
    bits = BITS[precision]
    if bits == 32:
        return 4.0
    return bits / 8 + 4 / QUANT_BLOCK + (bits / 8) / QUANT_BLOCK  # packed weights + fp32 scale + zero point


def predict(
    spec: ModelSpec,
    layer_params: Sequence[int],
    *,
    precision: str,
    context_length: int,
    prefill_tokens: int,
    bandwidth_gbps: float,
    compute_gflops: float,
    op_overhead_us: float,
) -> Prediction:
    """Bytes and milliseconds for a model whose projections hold `layer_params` weights each."""
    per_weight = bytes_per_weight(precision)
    matmul_params = sum(layer_params) + spec.lm_head_params
    weights_bytes = int(per_weight * (matmul_params + spec.embedding_params) + 4 * spec.other_params)
    kv_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    kv_cache_bytes = 2 * kv_per_token * context_length  # past inputs and present outputs are separate buffers
    t = prefill_tokens
    width = max([spec.hidden_size, *(layer.d_out for layer in spec.layers)])
    activations = 4 * t * (4 * spec.hidden_size + 2 * width) + 4 * spec.num_attention_heads * t * t
    workspace = activations + 4 * spec.vocab_size + RUNTIME_OVERHEAD_BYTES
    bandwidth = bandwidth_gbps * 1e9
    compute = compute_gflops * 1e9
    attn_dims = spec.num_layers * spec.num_attention_heads * spec.head_dim

    factorized = sum(1 for params, layer in zip(layer_params, spec.layers, strict=True) if params != layer.params)
    dispatch = 1e-6 * op_overhead_us * (spec.num_layers * GRAPH_NODES_PER_BLOCK + factorized)
    decode_bytes = per_weight * matmul_params + 4 * spec.other_params + kv_per_token * t
    decode_flops = 2 * matmul_params + 4 * attn_dims * t
    prefill_flops = 2 * matmul_params * t + 2 * attn_dims * t * t
    return Prediction(
        weights_bytes=weights_bytes,
        kv_cache_bytes=kv_cache_bytes,
        workspace_bytes=int(workspace),
        memory_bytes=int(weights_bytes + kv_cache_bytes + workspace),
        prefill_ms=1e3 * (max(weights_bytes / bandwidth, prefill_flops / compute) + dispatch),
        decode_ms_per_token=1e3 * (max(decode_bytes / bandwidth, decode_flops / compute) + dispatch),
    )


def predict_for_device(spec: ModelSpec, layers: Sequence[LayerPlan], profile: DeviceProfile) -> Prediction:
    return predict(
        spec,
        [layer.params for layer in layers],
        precision=profile.precision,
        context_length=profile.context_length,
        prefill_tokens=profile.prefill_tokens,
        bandwidth_gbps=profile.memory_bandwidth_gbps,
        compute_gflops=profile.compute_gflops,
        op_overhead_us=profile.op_overhead_us,
    )


def layers_at(spec: ModelSpec, keep_ratio: float, rank_multiple: int) -> tuple[LayerPlan, ...]:
    """Every projection at `keep_ratio` of its break-even rank; dense where factorizing would not pay.
    A keep ratio of 1 (or more) is the dense model."""
    if keep_ratio >= 1.0:
        return tuple(LayerPlan(layer.name, layer.d_in, layer.d_out, None) for layer in spec.layers)
    plans = []
    for layer in spec.layers:
        rank = max(rank_multiple, round(keep_ratio * layer.break_even_rank / rank_multiple) * rank_multiple)
        dense = rank >= layer.break_even_rank
        plans.append(LayerPlan(layer.name, layer.d_in, layer.d_out, None if dense else rank))
    return tuple(plans)


def make_plan(spec: ModelSpec, profile: DeviceProfile, rank_multiple: int = 8) -> RankPlan:
    """The largest uniform keep ratio whose predicted memory and latency meet the profile's budgets."""
    if rank_multiple < 1:
        raise UsageError(f"--rank-multiple {rank_multiple}: must be a positive integer")
    if spec.max_positions and profile.context_length > spec.max_positions:
        raise UsageError(
            f"{profile.name}: context_length {profile.context_length} exceeds the {spec.max_positions} positions "
            f"this {spec.model_type} model supports; lower context_length in the profile"
        )
    dense = layers_at(spec, 1.0, rank_multiple)
    dense_predicted = predict_for_device(spec, dense, profile)
    if not _violations(dense_predicted, profile):
        return _plan(spec, profile, dense, rank_multiple, dense_predicted)
    smallest = layers_at(spec, 0.0, rank_multiple)
    violations = _violations(predict_for_device(spec, smallest, profile), profile)
    if violations:
        raise BudgetError(
            f"{profile.name}: no plan fits: even with every projection at rank {rank_multiple}, "
            + "; ".join(violations)
            + ". Raise the budget, shorten context_length or choose a lower precision"
        )
    low, high = 0.0, 1.0  # low always fits, high never does
    for _ in range(_SEARCH_STEPS):
        mid = (low + high) / 2
        if _violations(predict_for_device(spec, layers_at(spec, mid, rank_multiple), profile), profile):
            high = mid
        else:
            low = mid
    layers = layers_at(spec, low, rank_multiple)
    return _plan(spec, profile, layers, rank_multiple, dense_predicted)


def _plan(spec, profile, layers, rank_multiple, dense_predicted) -> RankPlan:
    kept = sum(layer.params for layer in layers) / sum(layer.params for layer in spec.layers)
    return RankPlan(
        device=profile.name,
        precision=profile.precision,
        keep_ratio=round(kept, 6),
        rank_multiple=rank_multiple,
        layers=layers,
        predicted=predict_for_device(spec, layers, profile),
        dense_predicted=dense_predicted,
    )


def _violations(p: Prediction, profile: DeviceProfile) -> list[str]:
    """Each budget the prediction misses, stated with the predicted figure."""
    out = []
    if p.memory_bytes > profile.memory_budget_bytes:
        out.append(
            f"memory needs {p.memory_bytes / MIB:.1f} MiB (weights {p.weights_bytes / MIB:.1f}, KV cache "
            f"{p.kv_cache_bytes / MIB:.1f}, workspace {p.workspace_bytes / MIB:.1f}) > budget "
            f"{profile.memory_budget_mib:g} MiB"
        )
    if p.decode_ms_per_token > profile.decode_ms_per_token:
        out.append(
            f"decode needs {p.decode_ms_per_token:.1f} ms/token > budget {profile.decode_ms_per_token:g} ms/token"
        )
    if p.prefill_ms > profile.prefill_ms:
        out.append(
            f"prefill of {profile.prefill_tokens} tokens needs {p.prefill_ms:.0f} ms > budget {profile.prefill_ms:g} ms"
        )
    return out
