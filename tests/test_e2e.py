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


def test_wearable_plan_must_compress_and_fits():
    profile = load_profile(ROOT / "device_profiles" / "wearable.yaml")
    done = edgeslim("plan", "--device", "device_profiles/wearable.yaml", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["predicted"]["memory_bytes"] <= profile.memory_budget_bytes
    assert plan["predicted"]["weights_bytes"] <= profile.memory_budget_bytes
    assert plan["dense_predicted"]["memory_bytes"] > profile.memory_budget_bytes, "the budget must force compression"
    assert any(layer["kind"] == "factorized" for layer in plan["layers"])


def test_phone_export_validates_and_fits(tmp_path):
    out = tmp_path / "smollm2-phone"
    done = edgeslim("export", "--device", "device_profiles/phone.yaml", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "plan.json", "report.json",
            "tokenizer.json"} <= files
    report = json.loads((out / "report.json").read_text())
    profile = report["profile"]
    budget = profile["memory_budget_mib"] * MIB
    assert report["passed"] is True
    assert report["artifact"]["file_bytes"] <= budget
    assert 0 < report["measurement"]["peak_memory_bytes"] <= budget
    assert all(p["passed"] and p["greedy_identical"] for p in report["parity"])
    assert {p["graph"] for p in report["parity"]} == {"reference fp32", f"shipped {profile['precision']}"}
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is False
    assert genai["model"]["decoder"]["num_hidden_layers"] == 30
    assert not list(tmp_path.glob(".*partial*")), "no staging folder may be left behind"
