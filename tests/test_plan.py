"""The planner: break-even and rounding rules, budgets met, impossible budgets explained."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import build_tiny

from exporter.contracts import MIB, DeviceProfile, LayerSpec, ModelSpec
from exporter.errors import BudgetError, UsageError
from exporter.models import describe, normalize_
from exporter.plan import (
    MEMORY_MARGIN,
    allocate,
    default_rank_multiple,
    layers_at,
    make_plan,
    matrix_bytes,
    predict_for_device,
    rank_options,
)
from exporter.quantize import int4_bytes
from exporter.select import get_method
from exporter.sensitivity import layer_costs

PROFILE = DeviceProfile(
    name="t", description="", execution_providers=("CPUExecutionProvider",), threads=1, precision="fp32",
    context_length=128, memory_budget_mib=1000, decode_ms_per_token=1000, prefill_ms=1000, prefill_tokens=32,
    memory_bandwidth_gbps=10, compute_gflops=10,
)


def spec_with(layers):
    return ModelSpec(model_type="llama", num_layers=1, hidden_size=64, vocab_size=100, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, tied_embeddings=True, max_positions=512, layers=tuple(layers),
                     embedding_params=6400, lm_head_params=6400, other_params=128)


def test_ranks_are_multiples_and_dense_at_break_even():
    spec = spec_with([LayerSpec("a", 64, 64, False), LayerSpec("b", 64, 256, True)])
    for keep in (0.0, 0.3, 0.7):
        for layer in layers_at(spec, keep, 8):
            assert layer.dense or layer.rank % 8 == 0
            assert layer.dense or layer.rank < layer.d_in * layer.d_out / (layer.d_in + layer.d_out)
    assert all(layer.dense for layer in layers_at(spec, 1.0, 8))  # rank >= break-even: stays dense
    assert [layer.rank for layer in layers_at(spec, 0.5, 16)] == [16, 32]


def test_plan_meets_budget_and_is_tightest():
    spec = describe(normalize_(build_tiny("llama")))
    dense = predict_for_device(spec, layers_at(spec, 1.0, 8), PROFILE)
    small = predict_for_device(spec, layers_at(spec, 0.0, 8), PROFILE)
    budget_ms = (dense.prefill_ms + small.prefill_ms) / 2
    profile = dataclasses.replace(PROFILE, prefill_ms=budget_ms, compute_gflops=PROFILE.compute_gflops)
    plan = make_plan(spec, profile)
    assert plan.predicted.prefill_ms <= budget_ms
    assert 0 < plan.keep_ratio < 1
    assert plan.factorized
    assert plan.dense_predicted.prefill_ms > budget_ms


def test_dense_when_everything_fits():
    spec = describe(normalize_(build_tiny("qwen2")))
    plan = make_plan(spec, PROFILE)
    assert plan.keep_ratio == 1.0 and not plan.factorized


def test_impossible_budget_states_smallest_figure():
    spec = describe(normalize_(build_tiny("gpt2")))
    profile = dataclasses.replace(PROFILE, memory_budget_mib=1)
    with pytest.raises(BudgetError) as error:
        make_plan(spec, profile)
    message = str(error.value)
    assert "even with every projection at rank 8" in message and "memory needs" in message
    assert "> budget 1 MiB" in message


def test_int4_bytes_count_blocks_scales_and_padding():
    assert matrix_bytes(64, 64, "fp32") == 4 * 64 * 64
    assert int4_bytes(64, 64) == 64 * (2 * (16 + 4) + 1)  # two blocks a row: packed weights, scales, zero points
    assert int4_bytes(64, 8) == int4_bytes(64, 32)  # K is padded to whole blocks: rank 8 costs rank 32
    spec = describe(normalize_(build_tiny("llama")))
    layers = layers_at(spec, 1.0, 8)
    sizes = [predict_for_device(spec, layers, dataclasses.replace(PROFILE, precision=p)).weights_bytes
             for p in ("fp32", "int4")]
    assert sizes == sorted(sizes, reverse=True)


def test_fp16_kv_cache_halves_the_cache():
    spec = describe(normalize_(build_tiny("llama")))
    layers = layers_at(spec, 1.0, 8)
    fp32, fp16 = (predict_for_device(spec, layers, dataclasses.replace(PROFILE, kv_cache_precision=kv))
                  for kv in ("fp32", "fp16"))
    per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    assert fp16.kv_cache_bytes * 2 == fp32.kv_cache_bytes == per_token * PROFILE.context_length


def test_int4_rank_multiple_follows_the_block():
    assert default_rank_multiple("int4") == 32 and default_rank_multiple("fp32") == 8
    assert rank_options(576, 576, 32) == [32, 64, 96, 128, 160, 192, 224, 256]  # below break-even 288


def test_context_beyond_the_model_is_a_usage_error():
    spec = describe(normalize_(build_tiny("gpt2")))  # 256 learned positions
    with pytest.raises(UsageError, match="exceeds the 256 positions"):
        make_plan(spec, dataclasses.replace(PROFILE, context_length=1024))


def test_plans_are_deterministic():
    spec = describe(normalize_(build_tiny("llama")))
    dense = predict_for_device(spec, layers_at(spec, 1.0, 8), PROFILE)
    small = predict_for_device(spec, layers_at(spec, 0.0, 8), PROFILE)
    profile = dataclasses.replace(PROFILE, prefill_ms=(dense.prefill_ms + small.prefill_ms) / 2)
    assert make_plan(spec, profile) == make_plan(spec, profile)
    assert make_plan(spec, profile).factorized


def squeezed(spec, profile):
    """The profile with a prefill budget halfway between the dense and the smallest plan's."""
    dense = predict_for_device(spec, layers_at(spec, 1.0, 8), profile)
    small = predict_for_device(spec, layers_at(spec, 0.0, 8), profile)
    return dataclasses.replace(profile, prefill_ms=(dense.prefill_ms + small.prefill_ms) / 2)


def test_allocation_compresses_where_the_estimated_loss_is_lowest():
    spec = spec_with([LayerSpec("important", 64, 64, False), LayerSpec("unimportant", 64, 64, False)])
    profile = squeezed(spec, PROFILE)
    costs = {"important": {r: 100.0 / r for r in rank_options(64, 64, 8)},
             "unimportant": {r: 0.01 / r for r in rank_options(64, 64, 8)}}
    plan = allocate(spec, profile, costs, 8)
    ranks = {layer.name: layer.rank for layer in plan.layers}
    assert plan.allocation == "sensitivity"
    assert plan.predicted.prefill_ms <= profile.prefill_ms
    assert ranks["important"] is None, "the costly layer stays dense"
    assert ranks["unimportant"] is not None and ranks["unimportant"] % 8 == 0
    assert plan.estimated_loss_increase == pytest.approx(costs["unimportant"][ranks["unimportant"]])


def test_allocation_ships_dense_when_dense_fits():
    spec = describe(normalize_(build_tiny("qwen2")))
    plan = allocate(spec, PROFILE, {})  # no costs needed: nothing is compressed
    assert plan.allocation == "dense" and not plan.factorized and plan.estimated_loss_increase == 0


def test_int4_plans_choose_what_the_matmuls_compute_with():
    spec = describe(normalize_(build_tiny("llama")))
    profile = dataclasses.replace(PROFILE, precision="int4")
    assert make_plan(spec, profile).activations == "int8"  # fastest when everything fits
    fast = predict_for_device(spec, layers_at(spec, 1.0, 32), profile, "int8")
    lean = predict_for_device(spec, layers_at(spec, 1.0, 32), profile, "fp32")
    assert lean.memory_bytes < fast.memory_bytes and lean.decode_ms_per_token >= fast.decode_ms_per_token
    budget = (lean.memory_bytes + fast.memory_bytes) / 2 / MIB / (1 - MEMORY_MARGIN)
    plan = make_plan(spec, dataclasses.replace(profile, memory_budget_mib=budget))
    assert plan.allocation == "dense" and plan.activations != "int8"  # less memory, nothing factorized


def test_vocabulary_rows_are_bought_where_they_are_cheap():
    """A model whose vocabulary dominates (Qwen2.5-0.5B's shape: 152k tokens, hidden 896, 24 layers) on the
    raspberry-pi-5 budget: the plan drops vocabulary rows the task does not use before it cuts deep into layers."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from exporter.profile import load_profile
    from exporter.vocabulary import candidates

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.device("meta"):
        spec = describe(AutoModelForCausalLM.from_config(config))
    profile = load_profile(Path(__file__).resolve().parent.parent / "device_profiles" / "raspberry-pi-5.yaml")
    # costs of the sizes measured on SmolLM2: a layer cut to a few bases costs a few hundredths of a nat; keeping a
    # quarter of the vocabulary a tenth (exporter.sensitivity, exporter.vocabulary)
    costs = {layer.name: {r: 0.03 * (1 - r / layer.break_even_rank) for r in rank_options(layer.d_in, layer.d_out, 32)}
             for layer in spec.layers}
    vocabulary = {rows: 0.03 * (spec.vocab_size / rows - 1) for rows in candidates(spec.vocab_size)}
    plan = allocate(spec, profile, costs, vocabulary_costs=vocabulary)
    assert plan.predicted.memory_bytes <= profile.memory_budget_bytes
    assert plan.vocabulary is not None, "the 152k-row table is where bytes are cheapest"
    assert plan.estimated_loss_increase == pytest.approx(
        vocabulary[plan.vocabulary] + sum(costs[layer.name][layer.rank] for layer in plan.factorized))
    without = allocate(spec, profile, costs)  # no vocabulary option: the layers pay for everything
    assert without.keep_ratio < plan.keep_ratio and without.estimated_loss_increase > plan.estimated_loss_increase


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
def test_a_layers_price_at_fp32_is_the_fisher_weighted_output_error_of_its_truncation(shape):
    """½ Σ_j F_j Σ_t (δW x_t)_j² / n for SVD-LLM's truncation at each rank (what `layer_costs` prices); at int4 a
    factorized layer costs at least its truncation."""
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    x = torch.randn(300, shape[1], dtype=torch.float64) * torch.logspace(-1, 1, shape[1], dtype=torch.float64)
    gram, fisher = x.T @ x / 300, torch.logspace(-3, 0, shape[0], dtype=torch.float64)
    ranks = [4, 8, 12]
    costs = layer_costs(weight, gram, fisher, ranks, "fp32")
    for rank in ranks:
        factors = get_method("svdllm").select(weight.double(), None, {"gram": gram}, rank)
        error = (weight.double() - factors.second @ factors.first) @ x.T  # d_out x tokens
        assert costs[rank] == pytest.approx(0.5 * float((fisher[:, None] * error.square()).sum()) / 300, rel=1e-9)
    rounded = layer_costs(weight, gram.float(), fisher, ranks, "int4")
    assert all(rounded[rank] >= costs[rank] * (1 - 1e-6) for rank in ranks)
