"""The command line: one line per error with the right exit code, JSON plans, the device list."""

from __future__ import annotations

import json

from click.testing import CliRunner
from test_pipeline import write_profile

from exporter.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_devices_lists_shipped_profiles():
    result = invoke("devices")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) >= 5 and any(line.startswith("wearable") for line in lines)


def test_plan_json_on_tiny_model(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml")
    result = invoke("plan", "--device", str(profile), "--model", str(tiny_model_dir), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # progress goes to stderr
    assert plan["type"] == "RankPlan" and plan["version"] == 1
    assert {"name", "shape", "rank", "kind"} <= set(plan["layers"][0])
    assert {"weights_bytes", "memory_bytes", "decode_ms_per_token"} <= set(plan["predicted"])
    assert any(layer["kind"] == "factorized" for layer in plan["layers"])


def test_bad_profile_is_one_line_exit_2(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("name: x\nthreds: 4\n")
    result = invoke("plan", "--device", str(profile))
    assert result.exit_code == 2
    assert result.output.startswith("edgeslim: error: ")
    assert "threds" in result.output and "did you mean threads?" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_impossible_budget_exit_3(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml", memory_budget_mib=1)
    result = invoke("plan", "--device", str(profile), "--model", str(tiny_model_dir))
    assert result.exit_code == 3
    assert "no plan fits" in result.output and len(result.output.strip().splitlines()) == 1


def test_unknown_task_and_method_exit_2(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml")
    for flag, value in (("--task", "poetry"), ("--method", "magic")):
        result = invoke("export", "--device", str(profile), "--model", str(tiny_model_dir), flag, value)
        assert result.exit_code == 2, result.output
        assert "choose one of" in result.output


def test_out_is_a_file_exit_2(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml")
    target = tmp_path / "file"
    target.write_text("x")
    result = invoke("export", "--device", str(profile), "--model", str(tiny_model_dir), "--out", str(target))
    assert result.exit_code == 2 and "is a file" in result.output


def test_out_under_a_file_exit_2(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("export", "--device", str(profile), "--model", str(tiny_model_dir), "--out",
                    str(blocker / "out"))
    assert result.exit_code == 2 and "is not a writable folder" in result.output


def test_missing_data_dir_exit_2(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml")
    result = invoke("export", "--device", str(profile), "--model", str(tiny_model_dir), "--task", "gsm8k",
                    "--data-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "is missing; pass --data-dir" in result.output
