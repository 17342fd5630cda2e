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

Allocation, two ways (the same budget rule, the same rounding to a multiple of 8, the same break-even rule: a layer
whose rank would reach d_in*d_out/(d_in+d_out) stays dense):
- `make_plan` (uniform): one keep ratio `a` for every projection (rank = a x break-even rank); the largest `a`
  that meets every budget wins. Needs nothing but shapes.
- `allocate` (global): ranks spent where the selection method's scores say bases matter most per byte.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import replace

import torch

from exporter.contracts import MIB, DeviceProfile, LayerPlan, LayerSpec, ModelSpec, Prediction, RankPlan
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


def predict_for_host(spec: ModelSpec, layers: Sequence[LayerPlan], profile: DeviceProfile, host: dict) -> Prediction:
    """The same plan on this machine (its measured figures), to check the cost model against measurements."""
    here = replace(profile, memory_bandwidth_gbps=host["memory_bandwidth_gbps"],
                   compute_gflops=host["compute_gflops"], op_overhead_us=host["op_overhead_us"])
    return predict_for_device(spec, layers, here)


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
    _check_limits(spec, profile, rank_multiple)
    dense = layers_at(spec, 1.0, rank_multiple)
    dense_predicted = predict_for_device(spec, dense, profile)
    if not _violations(dense_predicted, profile):
        return _plan(spec, profile, dense, rank_multiple, dense_predicted)
    _raise_if_impossible(spec, profile, layers_at(spec, 0.0, rank_multiple), rank_multiple)
    low, high = 0.0, 1.0  # low always fits, high never does
    for _ in range(_SEARCH_STEPS):
        mid = (low + high) / 2
        if _violations(predict_for_device(spec, layers_at(spec, mid, rank_multiple), profile), profile):
            high = mid
        else:
            low = mid
    layers = layers_at(spec, low, rank_multiple)
    return _plan(spec, profile, layers, rank_multiple, dense_predicted)


def allocate(
    spec: ModelSpec, profile: DeviceProfile, scores: dict[str, torch.Tensor], rank_multiple: int = 8
) -> RankPlan:
    """Budget-driven allocation: ranks chosen across all layers by what each kept basis is worth per byte.

    `scores[name]` holds, in the order the selection method keeps bases, what keeping each one is worth (its
    share of the loss the method estimates). Starting from every projection at `rank_multiple`, the next
    `rank_multiple` bases of whichever layer offer the most score per weight are added, until the budget is
    spent; a layer whose rank reaches its break-even rank turns dense (all its bases, d_in*d_out weights).
    Gains within a layer only shrink, so the greedy order is the knapsack's fractional optimum.
    """
    _check_limits(spec, profile, rank_multiple)
    dense = layers_at(spec, 1.0, rank_multiple)
    dense_predicted = predict_for_device(spec, dense, profile)
    if not _violations(dense_predicted, profile):
        return _plan(spec, profile, dense, rank_multiple, dense_predicted)
    start = {layer.name: rank_multiple for layer in spec.layers}
    _raise_if_impossible(spec, profile, _ranked_layers(spec, start), rank_multiple)
    steps = _greedy_steps(spec, scores, rank_multiple)

    def state(count: int) -> tuple[LayerPlan, ...]:
        ranks = dict(start)
        for name, rank in steps[:count]:
            ranks[name] = rank
        return _ranked_layers(spec, ranks)

    low, high = 0, len(steps)  # state(low) fits; find the longest prefix that still fits
    while low < high:
        mid = (low + high + 1) // 2
        if _violations(predict_for_device(spec, state(mid), profile), profile):
            high = mid - 1
        else:
            low = mid
    return replace(_plan(spec, profile, state(low), rank_multiple, dense_predicted), allocation="global")


def _greedy_steps(spec: ModelSpec, scores: dict[str, torch.Tensor], multiple: int) -> list[tuple[str, int | None]]:
    """Every (layer, new rank) step in greedy order; None as the rank means the layer turns dense."""

    def next_step(layer: LayerSpec, rank: int) -> tuple[float, int | None, int] | None:
        values = scores[layer.name].double()
        following = rank + multiple
        if following >= layer.break_even_rank:  # the next step keeps everything: the dense matrix
            gain, cost, new_rank = float(values[rank:].sum()), layer.params - rank * (layer.d_in + layer.d_out), None
        else:
            gain, cost, new_rank = float(values[rank:following].sum()), multiple * (layer.d_in + layer.d_out), following
        return -gain / max(cost, 1), new_rank, rank

    heap = []
    for index, layer in enumerate(spec.layers):
        priority, new_rank, _ = next_step(layer, multiple)
        heapq.heappush(heap, (priority, index, new_rank))
    steps = []
    while heap:
        _, index, new_rank = heapq.heappop(heap)
        layer = spec.layers[index]
        steps.append((layer.name, new_rank))
        if new_rank is not None:
            priority, following, _ = next_step(layer, new_rank)
            heapq.heappush(heap, (priority, index, following))
    return steps


def _ranked_layers(spec: ModelSpec, ranks: dict[str, int | None]) -> tuple[LayerPlan, ...]:
    return tuple(LayerPlan(layer.name, layer.d_in, layer.d_out, ranks[layer.name]) for layer in spec.layers)


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


def _check_limits(spec: ModelSpec, profile: DeviceProfile, rank_multiple: int) -> None:
    if rank_multiple < 1:
        raise UsageError(f"--rank-multiple {rank_multiple}: must be a positive integer")
    if spec.max_positions and profile.context_length > spec.max_positions:
        raise UsageError(
            f"{profile.name}: context_length {profile.context_length} exceeds the {spec.max_positions} positions "
            f"this {spec.model_type} model supports; lower context_length in the profile"
        )


def _raise_if_impossible(spec, profile, smallest: tuple[LayerPlan, ...], rank_multiple: int) -> None:
    violations = _violations(predict_for_device(spec, smallest, profile), profile)
    if violations:
        raise BudgetError(
            f"{profile.name}: no plan fits: even with every projection at rank {rank_multiple}, "
            + "; ".join(violations)
            + ". Raise the budget, shorten context_length or choose a lower precision"
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
