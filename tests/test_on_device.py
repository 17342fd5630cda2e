"""The on-device loop: scripts/bench_on_device.py on an export (here, and on emulated ARM64), then calibrate."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from test_pipeline import write_profile

from exporter.cli import main
from exporter.pipeline import RunConfig, run

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_on_device.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_model_dir) -> tuple[Path, Path]:
    """(export folder, the profile it was made for): a trained tiny Llama, factorized by the profile's budget, with
    the ORT-format package (the profile lists XNNPACK, which the int4 graph cannot use)."""
    work = tmp_path_factory.mktemp("on-device")
    profile = write_profile(work / "p.yaml")
    run(RunConfig(device=str(profile), model=str(trained_model_dir), out=str(work / "out"), parity_prompts=1,
                  use_cache=False, max_ppl_ratio=10.0, ort=True))
    return work / "out", profile


def bench(command: list[str], folder: Path, result: Path, *flags: str) -> dict:
    subprocess.run([*command, str(SCRIPT), str(folder), "--json", str(result), *flags], check=True,
                   capture_output=True, cwd=folder.parent)  # run away from the repository, as on a device
    return json.loads(result.read_text())


def test_bench_on_device_reproduces_the_exports_tokens_and_names_where_ops_ran(exported, tmp_path):
    folder, _ = exported
    result = bench([sys.executable], folder, tmp_path / "r.json")
    assert result["device"]["machine"] == platform.machine()
    assert result["parity"]["identical"], result["parity"]
    measured = result["measurement"]
    assert measured["decode_ms_per_token"] > 0 and measured["prefill_ms"] > 0 and measured["peak_memory_bytes"] > 0
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    assert list(result["placement"]) == ["CPUExecutionProvider"]
    placed = result["placement"]["CPUExecutionProvider"]  # the graph as onnxruntime optimized it: shape ops fold
    for fused in ("MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized"):
        assert placed[fused] == sum(node.op_type == fused for node in graph.node)


def test_ort_package_runs_the_same_tokens_with_a_minimal_operator_list(exported, tmp_path):
    folder, _ = exported
    package = json.loads((folder / "report.json").read_text())["ort_package"]
    assert package["tokens_identical"] and package["greedy_steps"] > 0
    assert package["measurement"]["peak_memory_bytes"] > 0
    config = (folder / package["operators_file"]).read_text()
    assert "com.microsoft;1;" in config and "MatMulNBits" in config and "GroupQueryAttention" in config
    assert "Conv" not in config  # only what this graph uses: the reduced build leaves every other kernel out
    result = bench([sys.executable], folder, tmp_path / "r.json", "--graph", "model.ort", "--parity-only")
    assert result["graph"] == "model.ort" and result["parity"]["identical"], result["parity"]
    assert list(result["placement"]) == ["CPUExecutionProvider"]


def test_report_says_what_each_provider_could_run(exported):
    folder, _ = exported
    report = json.loads((folder / "report.json").read_text())
    fits = {fit["provider"]: fit for fit in report["providers"]}
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    assert fits["CPUExecutionProvider"]["supported_nodes"] == len(graph.node)
    xnnpack = fits["XnnpackExecutionProvider"]  # listed by the profile, not installed here
    assert not xnnpack["installed"] and xnnpack["known"] and xnnpack["supported_nodes"] == 0
    for provider in ("NnapiExecutionProvider", "CoreMLExecutionProvider", "QNNExecutionProvider"):
        fit = fits[provider]  # not listed: assessed anyway, from onnxruntime's own operator lists
        assert 0 < fit["supported_nodes"] < fit["nodes"]
        assert "com.microsoft:MatMulNBits" in fit["unsupported_operators"]


def test_plan_says_when_a_listed_provider_cannot_run_the_graph(exported, trained_model_dir):
    _, profile = exported  # lists XNNPACK, whose operators include neither MatMulNBits nor GroupQueryAttention
    done = CliRunner().invoke(main, ["plan", "--device", str(profile), "--model", str(trained_model_dir)])
    assert done.exit_code == 0, done.output
    assert "XnnpackExecutionProvider has no MatMulNBits or GroupQueryAttention" in done.output
    assert "exporting it needs about" in done.output  # and what the export itself will take here
    from exporter.profile import load_profile
    from exporter.providers import plan_notes

    for shipped in sorted((ROOT / "device_profiles").glob("*.yaml")):  # the defaults name what really runs
        assert plan_notes(load_profile(shipped)) == (), shipped.name


def test_calibrate_fits_the_profile_to_the_device_and_keeps_the_old_one(exported, tmp_path):
    folder, profile = exported
    result = tmp_path / "r.json"
    bench([sys.executable], folder, result)
    original = profile.read_bytes()
    out = tmp_path / "measured.yaml"
    done = CliRunner().invoke(main, ["calibrate", "--device", str(profile), "--results", str(result),
                                     "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert profile.read_bytes() == original
    from exporter.calibrate import errors, read_results
    from exporter.profile import load_profile

    before = errors(load_profile(profile), read_results([result]))[0]
    after = errors(load_profile(out), read_results([result]))[0]
    assert all(abs(a) < abs(b) for a, b in zip(after, before, strict=True))
    assert all(abs(a) < 0.05 for a in after)  # one device, one export: the fit reproduces it
    assert "prediction error" in done.output


def test_calibrate_needs_timings(exported, tmp_path):
    folder, profile = exported
    result = tmp_path / "r.json"
    bench([sys.executable], folder, result, "--parity-only")
    done = CliRunner().invoke(main, ["calibrate", "--device", str(profile), "--results", str(result)])
    assert done.exit_code == 2
    assert "without --parity-only" in done.output.strip().splitlines()[-1]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get") or platform.machine() != "x86_64",
                    reason="ARM64 emulation is set up with apt and a private mount namespace (root, Debian, x86)")
def test_arm64_kernels_reproduce_the_exports_tokens(exported, tmp_path):
    """onnxruntime's Arm CPU kernels (the ones phones run) under qemu-user: the same greedy tokens, every node on
    the CPU provider."""
    folder, _ = exported
    result = bench(["bash", str(ROOT / "scripts" / "arm64_emulated.sh")], folder, tmp_path / "r.json",
                   "--parity-only")
    assert result["device"]["machine"] == "aarch64"
    assert result["parity"]["identical"], result["parity"]
    here = bench([sys.executable], folder, tmp_path / "here.json", "--parity-only")
    assert result["placement"] == here["placement"]
