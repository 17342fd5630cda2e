"""The planner: which projections stay dense and which become rank-r factors, so the model fits a device profile
at the least estimated loss of quality; and what that plan costs there.

The cost model counts what exporter.graph builds, deliberately simple so its assumptions can be read off:
- weights: every matmul weight at the profile's precision (int4 as MatMulNBits holds it: half a byte a weight,
  K padded to blocks of 32, an fp32 scale and a 4-bit zero point per block, so rank 8 costs as much as rank 32);
  one embedding table shared with the lm_head when the model ties them; norms, biases and the rotary tables fp32;
- KV cache: keys and values for `context_length` tokens at the profile's `kv_cache_precision`, once: past and
  present share one buffer;
- resident weights: the file as onnxruntime holds it after prepacking, per compute mode, plus the runtime itself
  (`RESIDENT_PER_BYTE`, fitted to measurements); memory budgets are planned with a `MEMORY_MARGIN`;
- workspace: activations of a `prefill_tokens` prompt (logits for the last position only);
- latency: max(bytes moved / bandwidth, FLOPs / compute) + graph nodes x per-node overhead (nodes counted from the
  graph's structure, exporter.graph.node_count). Decode moves every matmul weight once per token and reads the KV
  cache; prefill does 2 FLOPs per projection weight per prompt token, the lm_head once (last position only), plus
  attention.

Allocation, when the dense model does not fit:
- `allocate` (default): a knapsack over per-layer options (dense, or rank r on the block grid below break-even),
  priced by the estimated loss increase of each option at the shipped precision (exporter.sensitivity). Starting
  dense, the move that costs the least estimated loss per byte saved, over every layer and every lower option,
  is taken until the budget is met; dense stays a first-class option for every layer. It runs once per choice of
  vocabulary rows (all, or the rows the task uses, exporter.vocabulary, at their measured cost) and per compute
  mode; the least total loss wins.
- `make_plan` with no estimates (`--allocation uniform`, and the published baselines): one keep ratio `a` for
  every projection (rank = a x break-even rank), the largest that fits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import replace

from exporter.contracts import MIB, DeviceProfile, LatencyTerms, LayerPlan, ModelSpec, Prediction, RankPlan
from exporter.errors import BudgetError, UsageError
from exporter.graph import COMPUTE_MODES, node_count
from exporter.quantize import int4_bytes

# Resident memory once onnxruntime has loaded and prepacked the weights, fitted to peak memory measured on
# SmolLM2-135M (dense and factorized, contexts 512 and 1024, prompts of 16 to 256 tokens) and on 2-layer models with
# vocabularies of 8k, 49k and 152k (README, "Cost model"): bytes per byte of the weights file by what the matmul
# computes with (int8 activations, MatMulNBits accuracy level 4, prepack each block with its scale and block sum;
# fp32 activations, level 0, pack a little smaller than the file; fp32 weights: MatMul's packed copies); the
# vocabulary table costs more (the lm_head's packing, plus the embedding's rows as they are read); plus the runtime
# itself and a little per decoder block.
RESIDENT_PER_BYTE = {"int8": 1.25, "fp32": 0.86, "fp32 weights": 1.16}
TABLE_PER_BYTE = {"int8": 2.2, "fp32": 1.6, "fp32 weights": 1.3}
RUNTIME_BYTES = 19 * MIB
PER_BLOCK_BYTES = 0.45 * MIB
MEMORY_MARGIN = 0.03  # of the memory budget kept free: the model's error on measurements is within 2 %
# activations onnxruntime's arena holds for a prompt, per token, in units of (hidden + 2 x widest projection)
# floats (SmolLM2-135M: 0.1 MiB a token); with an fp16 KV cache, fp32 copies for attention (hidden floats a token)
ACTIVATION_COPIES = 7
FP16_ATTENTION_COPIES = 16
# int4 matmuls with fp32 activations run this fraction as fast as with int8 ones (measured on this machine's CPU,
# SmolLM2-135M: prefill of 256 tokens 283 vs 325 ms, decode 5 vs 9-12 ms a token)
FP32_ACTIVATION_SPEED = {"prefill": 0.85, "decode": 0.5}
INT4_RANK_MULTIPLE = 32  # MatMulNBits pads K to blocks of 32: a rank off this grid buys nothing
_SEARCH_STEPS = 40


def default_rank_multiple(precision: str) -> int:
    return INT4_RANK_MULTIPLE if precision == "int4" else 8


def matrix_bytes(n: int, k: int, precision: str) -> int:
    """Bytes of an N x K matmul weight as the graph stores it."""
    return int4_bytes(n, k) if precision == "int4" else 4 * n * k


def layer_bytes(layer: LayerPlan, precision: str) -> int:
    if layer.rank is None:
        return matrix_bytes(layer.d_out, layer.d_in, precision)
    return matrix_bytes(layer.rank, layer.d_in, precision) + matrix_bytes(layer.d_out, layer.rank, precision)


def predict(spec: ModelSpec, layers: Sequence[LayerPlan], *, precision: str, context_length: int,
            prefill_tokens: int, bandwidth_gbps: float, compute_gflops: float, op_overhead_us: float,
            activations: str = "int8", kv_cache: str = "fp32", vocabulary: int | None = None) -> Prediction:
    """Bytes and milliseconds of the graph exporter.graph builds for this plan. `activations`: what int4 matmuls
    compute with (a graph.COMPUTE_MODES key); `vocabulary`: rows of the vocabulary table kept (None: all)."""
    rows = spec.vocab_size if vocabulary is None else vocabulary + 1  # kept rows and the bucket row
    table_bytes = matrix_bytes(rows, spec.hidden_size, precision)
    heads_bytes = table_bytes * (1 if spec.tied_embeddings else 2)  # embedding and lm_head: one table when tied
    positions_bytes = 4 * (spec.embedding_params - spec.vocab_size * spec.hidden_size)  # learned positions, fp32
    rotary_bytes = 4 * context_length * spec.head_dim  # cos and sin tables, head_dim / 2 each
    projection_bytes = sum(layer_bytes(layer, precision) for layer in layers)
    index_bytes = 0 if vocabulary is None else 4 * spec.vocab_size  # token id -> row
    weights_bytes = (projection_bytes + heads_bytes + positions_bytes + rotary_bytes + index_bytes
                     + 4 * spec.other_params)
    blocks_compute, head_compute = _compute(precision, activations)
    kv_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * (2 if kv_cache == "fp16" else 4)
    kv_cache_bytes = kv_per_token * context_length  # past and present share one buffer
    t = prefill_tokens
    width = max([spec.hidden_size, *(layer.d_out for layer in spec.layers)])
    per_token = ACTIVATION_COPIES * (spec.hidden_size + 2 * width) + (FP16_ATTENTION_COPIES * spec.hidden_size
                                                                       if kv_cache == "fp16" else 0)
    workspace = 4 * t * per_token + 4 * spec.num_attention_heads * t * t
    attn_dims = spec.num_layers * spec.num_attention_heads * spec.head_dim
    projection_params = sum(layer.params for layer in layers)
    head_params = rows * spec.hidden_size
    ranks = {layer.name: layer.rank for layer in layers}
    terms = LatencyTerms(
        prefill_bytes=weights_bytes,
        prefill_flops=((2 * projection_params * t + 2 * attn_dims * t * t) / _speed(blocks_compute, "prefill")
                       + 2 * head_params / _speed(head_compute, "prefill")),
        decode_bytes=projection_bytes + table_bytes + kv_per_token * t,
        decode_flops=((2 * projection_params + 4 * attn_dims * t) / _speed(blocks_compute, "decode")
                      + 2 * head_params / _speed(head_compute, "decode")),
        nodes=node_count(spec, ranks, precision, kv_cache, vocabulary is not None),
    )
    resident_weights = (RESIDENT_PER_BYTE[blocks_compute] * (weights_bytes - table_bytes)
                        + TABLE_PER_BYTE[head_compute] * table_bytes
                        + RUNTIME_BYTES + PER_BLOCK_BYTES * spec.num_layers)
    prefill_ms, decode_ms = latency_ms(terms, bandwidth_gbps, compute_gflops, op_overhead_us)
    return Prediction(
        weights_bytes=int(weights_bytes),
        kv_cache_bytes=int(kv_cache_bytes),
        workspace_bytes=int(workspace),
        memory_bytes=int(resident_weights + kv_cache_bytes + workspace),
        prefill_ms=prefill_ms,
        decode_ms_per_token=decode_ms,
        latency_terms=terms,
    )


def latency_ms(terms: LatencyTerms, bandwidth_gbps: float, compute_gflops: float,
               op_overhead_us: float) -> tuple[float, float]:
    """(prefill ms, decode ms/token): the roofline, max(bytes / bandwidth, FLOPs / compute), plus node dispatch."""
    bandwidth, compute, dispatch = bandwidth_gbps * 1e9, compute_gflops * 1e9, 1e-6 * op_overhead_us * terms.nodes
    return (1e3 * (max(terms.prefill_bytes / bandwidth, terms.prefill_flops / compute) + dispatch),
            1e3 * (max(terms.decode_bytes / bandwidth, terms.decode_flops / compute) + dispatch))


def _compute(precision: str, activations: str) -> tuple[str, str]:
    """(blocks, lm_head): "int8" or "fp32" activations for int4 weights; "fp32 weights" otherwise."""
    if precision != "int4":
        return "fp32 weights", "fp32 weights"
    blocks, head = COMPUTE_MODES[activations]
    return ("int8" if blocks else "fp32"), ("int8" if head else "fp32")


def _speed(compute: str, phase: str) -> float:
    return FP32_ACTIVATION_SPEED[phase] if compute == "fp32" else 1.0


def predict_for_device(spec: ModelSpec, layers: Sequence[LayerPlan], profile: DeviceProfile,
                       activations: str = "int8", vocabulary: int | None = None) -> Prediction:
    return predict(
        spec,
        layers,
        precision=profile.precision,
        context_length=profile.context_length,
        prefill_tokens=profile.prefill_tokens,
        bandwidth_gbps=profile.memory_bandwidth_gbps,
        compute_gflops=profile.compute_gflops,
        op_overhead_us=profile.op_overhead_us,
        activations=activations,
        kv_cache=profile.kv_cache_precision,
        vocabulary=vocabulary,
    )


def predict_for_host(spec: ModelSpec, plan: RankPlan, profile: DeviceProfile, host: dict) -> Prediction:
    """The same plan on this machine (its measured figures), to check the cost model against measurements."""
    here = replace(profile, memory_bandwidth_gbps=host["memory_bandwidth_gbps"],
                   compute_gflops=host["compute_gflops"], op_overhead_us=host["op_overhead_us"])
    return predict_for_device(spec, plan.layers, here, plan.activations, plan.vocabulary)


def activation_modes(profile: DeviceProfile) -> tuple[str, ...]:
    """What int4 matmuls may compute with, the faster first; fp32 weights compute in fp32."""
    return tuple(COMPUTE_MODES) if profile.precision == "int4" else ("fp32",)


def dense_layers(spec: ModelSpec) -> tuple[LayerPlan, ...]:
    return tuple(LayerPlan(layer.name, layer.d_in, layer.d_out, None) for layer in spec.layers)


def rank_options(d_in: int, d_out: int, multiple: int) -> list[int]:
    """Ranks a layer may take: multiples of `multiple` that hold fewer weights than the dense matrix."""
    break_even = d_in * d_out / (d_in + d_out)
    return [r for r in range(multiple, math.ceil(break_even), multiple) if r < break_even]


def layers_at(spec: ModelSpec, keep_ratio: float, rank_multiple: int) -> tuple[LayerPlan, ...]:
    """Every projection at `keep_ratio` of its break-even rank; dense where factorizing would not pay.
    A keep ratio of 1 (or more) is the dense model."""
    if keep_ratio >= 1.0:
        return dense_layers(spec)
    plans = []
    for layer in spec.layers:
        rank = max(rank_multiple, round(keep_ratio * layer.break_even_rank / rank_multiple) * rank_multiple)
        dense = rank >= layer.break_even_rank
        plans.append(LayerPlan(layer.name, layer.d_in, layer.d_out, None if dense else rank))
    return tuple(plans)


def make_plan(spec: ModelSpec, profile: DeviceProfile, rank_multiple: int | None = None) -> RankPlan:
    """The dense model when it fits (int8 activations preferred: faster); else the largest uniform keep ratio
    whose predictions meet every budget, in the activation mode that keeps the most."""
    multiple = rank_multiple or default_rank_multiple(profile.precision)
    _check_limits(spec, profile, multiple)
    dense = dense_layers(spec)
    for mode in activation_modes(profile):
        if not _violations(predict_for_device(spec, dense, profile, mode), profile):
            return _plan(spec, profile, dense, multiple, mode, "dense")
    plans = [_uniform(spec, profile, multiple, mode) for mode in activation_modes(profile)]
    fitting = [plan for plan in plans if plan is not None]
    if not fitting:
        _raise_if_impossible(spec, profile, layers_at(spec, 0.0, multiple), multiple, activation_modes(profile)[-1])
    return max(fitting, key=lambda plan: plan.keep_ratio)


def _uniform(spec, profile, multiple, mode) -> RankPlan | None:
    if _violations(predict_for_device(spec, layers_at(spec, 0.0, multiple), profile, mode), profile):
        return None
    low, high = 0.0, 1.0  # low always fits, high never does
    for _ in range(_SEARCH_STEPS):
        mid = (low + high) / 2
        if _violations(predict_for_device(spec, layers_at(spec, mid, multiple), profile, mode), profile):
            high = mid
        else:
            low = mid
    return _plan(spec, profile, layers_at(spec, low, multiple), multiple, mode, "uniform")


def allocate(spec: ModelSpec, profile: DeviceProfile, costs: dict[str, dict[int, float]],
             rank_multiple: int | None = None, vocabulary_costs: dict[int, float] | None = None) -> RankPlan:
    """The plan that meets every budget at the least estimated loss: the dense model when it fits, else a greedy
    knapsack over each layer's options, for each choice of vocabulary rows (`vocabulary_costs[rows]`: the measured
    loss increase of keeping that many, exporter.vocabulary) and each activation mode; the least total loss wins.
    `costs[layer][rank]` is the estimated loss increase per token of that layer at that rank (and the shipped
    precision) against the layer dense at the same precision."""
    multiple = rank_multiple or default_rank_multiple(profile.precision)
    _check_limits(spec, profile, multiple)
    dense = dense_layers(spec)
    for mode in activation_modes(profile):
        if not _violations(predict_for_device(spec, dense, profile, mode), profile):
            return _plan(spec, profile, dense, multiple, mode, "dense", 0.0)
    vocabularies = [(None, 0.0), *sorted((vocabulary_costs or {}).items(), reverse=True)]
    plans = [_knapsack(spec, profile, costs, multiple, mode, rows, cost)
             for rows, cost in vocabularies for mode in activation_modes(profile)]
    fitting = [plan for plan in plans if plan is not None]
    if not fitting:
        _raise_if_impossible(spec, profile, layers_at(spec, 0.0, multiple), multiple, activation_modes(profile)[-1],
                             vocabularies[-1][0])
    return min(fitting, key=lambda plan: plan.estimated_loss_increase)


def _knapsack(spec, profile, costs, multiple, mode, vocabulary, vocabulary_cost) -> RankPlan | None:
    layers = list(dense_layers(spec))
    options = []  # per layer: (rank, estimated cost), dense first, then fewer and fewer bytes
    for layer in spec.layers:
        ranks = sorted(rank_options(layer.d_in, layer.d_out, multiple), reverse=True)
        options.append([(None, 0.0), *((r, costs[layer.name][r]) for r in ranks)])
    position = [0] * len(layers)
    heap = [move for index in range(len(layers)) if (move := _best_move(layers, options, position, index, profile))]
    heapq.heapify(heap)
    while _violations(predict_for_device(spec, layers, profile, mode, vocabulary), profile):
        if not heap:
            return None
        _, index, target = heapq.heappop(heap)
        position[index] = target
        layers[index] = replace(layers[index], rank=options[index][target][0])
        if move := _best_move(layers, options, position, index, profile):
            heapq.heappush(heap, move)
    loss = vocabulary_cost + sum(options[i][position[i]][1] for i in range(len(layers)))
    return _plan(spec, profile, tuple(layers), multiple, mode, "sensitivity", loss, vocabulary)


def _best_move(layers: list[LayerPlan], options, position: list[int], index: int,
               profile: DeviceProfile) -> tuple[float, int, int] | None:
    """(estimated loss per byte saved, layer, option) of the best lower option for one layer, or None."""
    layer, here = layers[index], options[index][position[index]]
    here_bytes = layer_bytes(replace(layer, rank=here[0]), profile.precision)
    best = None
    for target in range(position[index] + 1, len(options[index])):
        rank, cost = options[index][target]
        saved = here_bytes - layer_bytes(replace(layer, rank=rank), profile.precision)
        if saved > 0:
            price = max(cost - here[1], 0.0) / saved
            if best is None or price < best[0]:
                best = (price, index, target)
    return best


def _plan(spec, profile, layers, rank_multiple, activations, allocation, loss=None, vocabulary=None) -> RankPlan:
    kept = sum(layer.params for layer in layers) / sum(layer.params for layer in spec.layers)
    return RankPlan(
        device=profile.name,
        precision=profile.precision,
        keep_ratio=round(kept, 6),
        rank_multiple=rank_multiple,
        layers=layers,
        predicted=predict_for_device(spec, layers, profile, activations, vocabulary),
        dense_predicted=predict_for_device(spec, dense_layers(spec), profile, activations),
        allocation=allocation,
        estimated_loss_increase=None if loss is None else round(loss, 6),
        activations=activations,
        vocabulary=vocabulary,
    )


def _check_limits(spec: ModelSpec, profile: DeviceProfile, rank_multiple: int) -> None:
    if rank_multiple < 1:
        raise UsageError(f"--rank-multiple {rank_multiple}: must be a positive integer")
    if spec.max_positions and profile.context_length > spec.max_positions:
        raise UsageError(
            f"{profile.name}: context_length {profile.context_length} exceeds the {spec.max_positions} positions "
            f"this {spec.model_type} model supports; lower context_length in the profile"
        )


def _raise_if_impossible(spec, profile, smallest: tuple[LayerPlan, ...], rank_multiple: int, mode: str,
                         vocabulary: int | None = None) -> None:
    violations = _violations(predict_for_device(spec, smallest, profile, mode, vocabulary), profile)
    if violations:
        raise BudgetError(
            f"{profile.name}: no plan fits: even with every projection at rank {rank_multiple}, "
            + "; ".join(violations)
            + ". Raise the budget, shorten context_length or choose a lower precision"
        )


def _violations(p: Prediction, profile: DeviceProfile) -> list[str]:
    """Each budget the prediction misses, stated with the predicted figure."""
    out = []
    if p.memory_bytes > (1 - MEMORY_MARGIN) * profile.memory_budget_bytes:
        out.append(
            f"memory needs {p.memory_bytes / MIB:.1f} MiB (weights file {p.weights_bytes / MIB:.1f}, KV cache "
            f"{p.kv_cache_bytes / MIB:.1f}, prompt workspace {p.workspace_bytes / MIB:.1f}) > budget "
            f"{profile.memory_budget_mib:g} MiB less a {MEMORY_MARGIN:.0%} margin"
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
