"""End-to-end runs of the pipeline on tiny random models (seconds each)."""

from __future__ import annotations

import json

import pytest
import yaml

from exporter.pipeline import RunConfig, run


def write_profile(path, **overrides):
    profile = {
        "name": "tiny-device",
        "execution_providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"],
        "threads": 1,
        "precision": "int4",
        "context_length": 64,
        "memory_budget_mib": 256,
        "latency": {"decode_ms_per_token": 1000, "prefill_ms": 8000, "prefill_tokens": 16},
        # slow enough that the tiny model's dense prefill (11 s) misses its budget: the plan must factorize
        "hardware": {"memory_bandwidth_gbps": 10, "compute_gflops": 0.001},
    }
    profile.update(overrides)
    path.write_text(yaml.safe_dump(profile))
    return path


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_export_validates_each_precision(tmp_path, tiny_model_dir, precision):
    profile = write_profile(tmp_path / "p.yaml", precision=precision)
    out = tmp_path / "out"
    result = run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(out), parity_prompts=2))
    assert result.passed, result.failures
    assert result.plan.factorized, "the budget should force factorization"
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "genai_config.json", "plan.json", "report.json", "tokenizer.json",
            "device_check.json"} <= names
    assert "reference-fp32.onnx" not in names
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    gated = {p["graph"] for p in report["parity"] if p["gated"]}
    assert all(p["passed"] for p in report["parity"] if p["gated"])
    assert "reference fp32" in gated
    assert report["stage_seconds"]["building the ONNX graph"] > 0  # where the run's time went
    peaks = report["stage_peak_mib"]  # and its memory (torch and onnxruntime alone are a few hundred MiB)
    assert peaks and set(peaks) <= set(report["stage_seconds"]) and max(peaks.values()) > 100
    if precision != "fp32":
        assert f"{precision} weights, exact compute" in gated
        assert f"shipped {precision}" in {p["graph"] for p in report["parity"] if not p["gated"]}
    quality = report["quality"]
    assert quality["passed"] and quality["ratio"] == pytest.approx(
        quality["shipped_perplexity"] / quality["reference_perplexity"], rel=1e-3)
    assert not {"exact-int4.onnx", "all-positions.onnx", "reference-fp32.onnx.data"} & names
    assert "XnnpackExecutionProvider" in report["providers_not_available"]
    assert report["measurement"]["peak_memory_bytes"] > 0


@pytest.mark.parametrize("arch", ["qwen2"], indirect=True)
@pytest.mark.parametrize("method", ["svdllm", "taylor", "hessian"])
def test_data_aware_method_with_sensitivity_allocation(tmp_path, tiny_model_dir, method):
    profile = write_profile(tmp_path / "p.yaml")
    out = tmp_path / "out"
    result = run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(out), parity_prompts=1,
                           method=method, calibration_samples=4, calibration_seq_len=32, max_ppl_ratio=100))
    assert result.passed, result.failures
    assert result.plan.allocation == "sensitivity" and result.method == method
    assert result.plan.estimated_loss_increase > 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["allocation"] == "sensitivity"
    ranks = {layer["rank"] for layer in plan["layers"]}
    assert len(ranks) > 1, "layers get the ranks their estimated loss justifies, not one ratio"


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_collected_statistics_are_cached_per_model_and_data(tmp_path, tiny_model_dir, monkeypatch):
    from exporter import cache, collect

    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "RESERVE_BYTES", 0)  # whatever this disk has free
    calls = []
    original = collect.activation_stats
    monkeypatch.setattr(collect, "activation_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    profile = write_profile(tmp_path / "p.yaml")
    config = dict(device=str(profile), model=str(tiny_model_dir), parity_prompts=1, method="svdllm",
                  calibration_samples=2, calibration_seq_len=32)
    first = run(RunConfig(out=str(tmp_path / "a"), **config))
    second = run(RunConfig(out=str(tmp_path / "b"), **config))
    assert len(calls) == 1, "the second run reuses the statistics"
    assert first.layers == second.layers
    run(RunConfig(out=str(tmp_path / "c"), seed=1, **config))  # other calibration sample: collected again
    assert len(calls) == 2


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_export_with_evaluation_renders_a_report(tmp_path, tiny_model_dir):
    """--eval puts dense, compressed and shipped metrics side by side; report.html renders in a browser."""
    from browser import render_in_browser

    profile = write_profile(tmp_path / "p.yaml")
    out = tmp_path / "out"
    result = run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(out), parity_prompts=1,
                           evaluate="mbpp:2", max_new_tokens=8))
    (evaluation,) = result.evaluations
    labels = [m.label for m in evaluation.models]
    assert labels == ["dense (PyTorch)", "compressed, int4-rounded (PyTorch)", "shipped int4 (onnxruntime)"]
    dense, compressed, shipped = evaluation.models
    assert [i.item for i in dense.items] == [i.item for i in shipped.items], "the same items for every model"
    # the shipped graph computes with int8 activations: close to the PyTorch model holding its weights, not equal
    assert shipped.perplexity == pytest.approx(compressed.perplexity, rel=0.05)
    assert len(compressed.items) == len(shipped.items) == 2
    assert dense.top1_vs_reference is None and shipped.top1_vs_reference is not None
    report = json.loads((out / "report.json").read_text())
    assert report["evaluations"][0]["task"] == "mbpp" and len(report["spectra"]) == 3
    page = render_in_browser(out / "report.html", tmp_path)
    for section in ("summary", "quality", "budgets", "ranks", "spectra", "parity", "evaluation-0"):
        assert f'id="{section}"' in page, section
    figures = page.count("<img")
    assert figures == 5 and f'data-rendered-figures="{figures}"' in page  # quality, budgets, ranks, spectra, eval


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_dense_ships_when_dense_fits(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml", latency={"decode_ms_per_token": 1000, "prefill_ms": 60000,
                                                          "prefill_tokens": 16})
    result = run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(tmp_path / "out"),
                           parity_prompts=1))
    assert result.passed, result.failures
    assert result.plan.allocation == "dense" and not result.plan.factorized and not result.layers
    assert result.quality.ratio < 1.05  # GPTQ on the dense model: about as good as rounding to nearest, or better


def test_over_compressed_model_fails_the_quality_gate(tmp_path, trained_model_dir):
    from click.testing import CliRunner

    from exporter.cli import main

    profile = write_profile(tmp_path / "p.yaml", quality={"max_ppl_ratio": 1.02},  # ranks of 8-16 in 128 dimensions
                            latency={"decode_ms_per_token": 1000, "prefill_ms": 3500, "prefill_tokens": 16})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "--device", str(profile), "--model", str(trained_model_dir),
                                       "--out", str(out), "--rank-multiple", "8", "--calibration-samples", "4"])
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("edgeslim: error: quality: held-out code perplexity") and "(limit 1.02x)" in line
    assert "the dense int4 model needs" in line  # what would meet it
    assert not out.exists() and (tmp_path / "out.failed" / "report.json").is_file()
