"""The planner: break-even and rounding rules, budgets met, impossible budgets explained."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import build_tiny

from exporter.contracts import DeviceProfile, LayerSpec, ModelSpec
from exporter.errors import BudgetError, UsageError
from exporter.models import describe, normalize_
from exporter.plan import bytes_per_weight, layers_at, make_plan, predict_for_device

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


def test_quantized_weights_are_smaller():
    assert bytes_per_weight("fp32") == 4
    assert 0.5 < bytes_per_weight("int4") < 0.7
    spec = describe(normalize_(build_tiny("llama")))
    layers = layers_at(spec, 1.0, 8)
    sizes = [predict_for_device(spec, layers, dataclasses.replace(PROFILE, precision=p)).weights_bytes
             for p in ("fp32", "int4")]
    assert sizes == sorted(sizes, reverse=True)


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


def test_global_allocation_spends_bytes_where_scores_are_high():
    import torch

    from exporter.plan import allocate

    spec = spec_with([LayerSpec("important", 64, 64, False), LayerSpec("unimportant", 64, 64, False)])
    scores = {"important": torch.linspace(100, 1, 64), "unimportant": torch.linspace(1, 0.01, 64)}
    dense = predict_for_device(spec, layers_at(spec, 1.0, 8), PROFILE)
    small = predict_for_device(spec, layers_at(spec, 0.0, 8), PROFILE)
    profile = dataclasses.replace(PROFILE, prefill_ms=(dense.prefill_ms + small.prefill_ms) / 2)
    plan = allocate(spec, profile, scores)
    ranks = {layer.name: layer.rank for layer in plan.layers}
    assert plan.allocation == "global"
    assert plan.predicted.prefill_ms <= profile.prefill_ms
    assert ranks["unimportant"] == 8
    assert ranks["important"] is None or ranks["important"] > 8
    assert all(rank is None or rank % 8 == 0 for rank in ranks.values())
    uniform = make_plan(spec, profile)
    assert plan.predicted.prefill_ms >= uniform.predicted.prefill_ms - 1e-9  # spends at least as much budget
