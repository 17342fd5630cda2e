"""Failure behaviour: interruptions and full disks leave nothing that looks finished; runs are deterministic."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from test_pipeline import write_profile

from exporter.cli import main
from exporter.errors import ValidationFailed
from exporter.pipeline import RunConfig, run

ROOT = Path(__file__).resolve().parent.parent


def previous_output(out: Path) -> Path:
    out.mkdir()
    marker = out / "model.onnx"
    marker.write_text("the previous good export")
    return marker


def start_export(profile: Path, model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", "export", "--device", str(profile), "--model", str(model),
         "--out", str(out), "--no-cache"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_staging(out: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(out.parent.glob(f".{out.name}.partial-*/model.onnx*")):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the export never started writing")


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_export_leaves_previous_output_and_nothing_finished(tmp_path, tiny_model_dir, how):
    profile = write_profile(tmp_path / "p.yaml")
    out = tmp_path / "out"
    marker = previous_output(out)
    process = start_export(profile, tiny_model_dir, out)
    wait_for_staging(out, process)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode != 0
    assert marker.read_text() == "the previous good export"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert not (tmp_path / "out.failed").exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    if how != signal.SIGKILL:  # Ctrl-C, kill, a CI timeout: cleaned up, and said so on one line
        assert not leftovers
        assert "interrupted" in stderr.strip().splitlines()[-1]
    else:  # SIGKILL cannot be caught: what remains is hidden and named partial, never the destination
        assert all(p.name.startswith(".out.partial-") for p in leftovers)


class SwallowsCtrlC:
    """Ctrl-C landing while a finalizer runs: CPython prints "Exception ignored" and the code around carries on."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt
@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_interrupt_swallowed_by_a_finalizer_still_stops_the_publish(tmp_path, tiny_model_dir, monkeypatch):
    """The window a random-delay SIGINT found (1 run in 40): the KeyboardInterrupt raised inside a weakref callback
    is ignored, so only the staging folder's own record of the signal can stop the publish."""
    from exporter import pipeline

    measure_quality = pipeline.measure_quality

    def quality_then_swallowed_interrupt(*args, **kwargs):
        SwallowsCtrlC()  # freed at once: its __del__ raises KeyboardInterrupt, which CPython ignores
        return measure_quality(*args, **kwargs)

    monkeypatch.setattr(pipeline, "measure_quality", quality_then_swallowed_interrupt)
    profile = write_profile(tmp_path / "p.yaml")
    out = tmp_path / "out"
    marker = previous_output(out)
    with pytest.raises(KeyboardInterrupt):
        run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(out), parity_prompts=1,
                      use_cache=False))
    assert marker.read_text() == "the previous good export"
    assert not list(tmp_path.glob(".out.partial-*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone again


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_disk_full_is_one_line_and_keeps_previous_output(tmp_path, tiny_model_dir, monkeypatch):
    from click.testing import CliRunner

    profile = write_profile(tmp_path / "p.yaml")
    out = tmp_path / "out"
    marker = previous_output(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".out.partial" / "model.onnx"))

    monkeypatch.setattr(onnx, "save_model", full_disk)
    result = CliRunner().invoke(main, ["export", "--device", str(profile), "--model", str(tiny_model_dir),
                                       "--out", str(out), "--no-cache"])
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "no output was written" in result.output
    assert marker.read_text() == "the previous good export"
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_failed_validation_goes_to_failed_folder(tmp_path, tiny_model_dir, monkeypatch):
    from exporter import validate

    monkeypatch.setattr(validate, "RELATIVE_TOLERANCE", -1.0)  # no graph can pass: a stand-in for a broken one
    profile = write_profile(tmp_path / "p.yaml")
    out = tmp_path / "out"
    marker = previous_output(out)
    with pytest.raises(ValidationFailed, match="parity reference fp32"):
        run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(out), parity_prompts=1,
                      use_cache=False))
    assert marker.read_text() == "the previous good export"
    assert (tmp_path / "out.failed" / "report.json").is_file()
    assert (tmp_path / "out.failed" / "model.onnx").is_file()  # the report sits next to the model it describes


@pytest.mark.parametrize("arch", ["qwen2"], indirect=True)
def test_same_inputs_give_identical_plan_and_weights(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml")
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(out), parity_prompts=1,
                      use_cache=False))
        outputs.append(out)
    a, b = outputs
    assert (a / "plan.json").read_bytes() == (b / "plan.json").read_bytes()
    assert (a / "model.onnx.data").read_bytes() == (b / "model.onnx.data").read_bytes()
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
