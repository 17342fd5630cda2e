"""End to end on the real default model, SmolLM2-135M-Instruct (minutes; marked e2e)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.contracts import MIB
from exporter.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def edgeslim(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], cwd=cwd, capture_output=True, text=True,
                          check=False)


def test_tight_watch_plan_must_compress_and_fits():
    """watch-lite: a budget the dense int4 model misses."""
    profile = load_profile(ROOT / "device_profiles" / "watch-lite.yaml")
    done = edgeslim("plan", "--device", "device_profiles/watch-lite.yaml", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["predicted"]["memory_bytes"] <= profile.memory_budget_bytes
    assert plan["dense_predicted"]["memory_bytes"] > profile.memory_budget_bytes, "the budget must force compression"
    assert plan["allocation"] == "sensitivity" and plan["estimated_loss_increase"] > 0
    # the cheapest bytes come first: vocabulary rows the code task never uses (a measured cost), then ranks
    assert plan["vocabulary"] is not None and plan["vocabulary"] < 49152
    assert all(layer["rank"] % 32 == 0 for layer in plan["layers"] if layer["rank"])  # MatMulNBits' block grid


EVAL = ("--eval", "gsm8k:3,mbpp:3", "--max-new-tokens", "128")


@pytest.fixture(scope="module")
def phone_export(tmp_path_factory) -> Path:
    """The README's main command, plus evaluation of a few GSM8K and MBPP items."""
    out = tmp_path_factory.mktemp("e2e") / "smollm2-phone"
    done = edgeslim("export", "--device", "device_profiles/phone.yaml", "--out", str(out), *EVAL)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_phone_export_validates_and_fits(phone_export):
    out, tmp_path = phone_export, phone_export.parent
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "plan.json", "report.json", "report.html",
            "tokenizer.json"} <= files
    report = json.loads((out / "report.json").read_text())
    profile = report["profile"]
    budget = profile["memory_budget_mib"] * MIB
    assert report["passed"] is True
    assert report["artifact"]["file_bytes"] <= budget
    assert 0 < report["measurement"]["peak_memory_bytes"] <= budget
    assert all(p["passed"] and p["greedy_identical"] for p in report["parity"] if p["gated"])
    assert {p["graph"] for p in report["parity"] if p["gated"]} == {"reference fp32", "int4 weights, exact compute"}
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert genai["model"]["decoder"]["num_hidden_layers"] == 30
    # onnxruntime-genai splits SmolLM2's text as it was trained (with the split left implied: every held-out text
    # differed)
    assert report["tokenizer"] == {**report["tokenizer"], "runtime": "onnxruntime-genai 0.18.0", "texts": 64,
                                   "differing": 0, "passed": True}
    assert not list(tmp_path.glob(".*partial*")), "no staging folder may be left behind"


def test_phone_export_is_lean_and_as_good_as_the_dense_int4_model(phone_export):
    """What ships: one int4 table, ~13 nodes a block (11, and casts for the fp16 KV cache), and held-out quality
    no worse than the dense int4 model that onnxruntime's own quantizer makes (86.5 MB from onnxruntime-genai's
    builder)."""
    report = json.loads((phone_export / "report.json").read_text())
    assert report["artifact"]["file_bytes"] <= 1.02 * 86.5e6
    assert report["artifact"]["nodes"] <= 13 * 30 + 20
    quality = report["quality"]
    assert quality["passed"] and quality["tokens"] > 2000
    assert quality["ratio"] <= 1.10, quality
    assert quality["dense_fp32_perplexity"] < quality["shipped_perplexity"]


def test_shipped_model_answers_like_the_pytorch_model(phone_export):
    """Same items for every model; the int4 graph (int8 activations) scores as the PyTorch model holding its weights."""
    report = json.loads((phone_export / "report.json").read_text())
    assert [e["task"] for e in report["evaluations"]] == ["gsm8k", "mbpp"]
    for evaluation in report["evaluations"]:
        dense, compressed, shipped = evaluation["models"]
        assert dense["label"] == "dense (PyTorch)" and shipped["label"].endswith("(onnxruntime)")
        assert [i["item"] for i in dense["items"]] == [i["item"] for i in shipped["items"]]
        assert shipped["perplexity"] == pytest.approx(compressed["perplexity"], rel=0.05)
        assert 0 <= shipped["top1_vs_reference"] <= 1 and shipped["kl_vs_reference"] >= 0
    assert report["evaluations"][1]["sandbox_network"] in ("namespace", "audit hook")


def test_eval_command_reproduces_the_exports_evaluation(phone_export, tmp_path):
    done = edgeslim("eval", str(phone_export), "--task", "mbpp", "--limit", "3", "--max-new-tokens", "128",
                    "--json", str(tmp_path / "mbpp.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "mbpp.json").read_text())["models"][0]
    report = json.loads((phone_export / "report.json").read_text())
    shipped = report["evaluations"][1]["models"][2]
    assert [i["completion"] for i in again["items"]] == [i["completion"] for i in shipped["items"]]
    assert again["perplexity"] == pytest.approx(shipped["perplexity"], rel=1e-4)


def test_report_renders_with_its_figures(phone_export, tmp_path):
    from browser import render_in_browser

    page = render_in_browser(phone_export / "report.html", tmp_path)
    for section in ("summary", "quality", "budgets", "ranks", "parity", "evaluation-0", "evaluation-1"):
        assert f'id="{section}"' in page, section
    figures = page.count("<img")  # quality, budgets, ranks, two evaluations (a dense plan has no spectra)
    assert figures == 5 and f'data-rendered-figures="{figures}"' in page


def test_tight_watch_export_ships_within_its_quality_limit(tmp_path):
    """watch-lite: the dense int4 model does not fit; what ships keeps every projection dense and drops the
    vocabulary rows the code task does not use, and stays within the profile's 1.5x quality limit."""
    out = tmp_path / "watch"
    done = edgeslim("export", "--device", "device_profiles/watch-lite.yaml", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["plan"]["vocabulary"] is not None
    assert report["quality"]["passed"] and report["quality"]["ratio"] <= 1.5
    assert report["measurement"]["peak_memory_bytes"] <= report["profile"]["memory_budget_mib"] * MIB
