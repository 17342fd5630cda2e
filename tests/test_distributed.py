"""Relearning scales out on accelerate: two CPU processes (gloo) under torchrun, one export, for relearning through
the whole model (basel, in memory) and a block at a time (basel-layerwise, layer streaming).

(`accelerate launch --cpu` starts a single process; on CPUs torchrun is the multi-process launcher, on GPUs
`accelerate launch --multi_gpu` or torchrun.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_pipeline import write_profile


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
@pytest.mark.parametrize(("method", "shared"), [
    ("basel", "collecting training (128 tokens) on 2 processes"),  # through the whole model, in memory
    ("basel-layerwise", "relearning a share of each block"),  # a block at a time, streaming
])
def test_relearning_runs_on_two_processes(tmp_path, tiny_model_dir, method, shared):
    profile = write_profile(tmp_path / "p.yaml", precision="fp32")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--module", "exporter.cli",
               "export", "--device", str(profile), "--model", str(tiny_model_dir),
               "--method", method, "--out", str(out), "--calibration-samples", "4", "--calibration-seq-len", "32"]
    env = {**os.environ, "EDGESLIM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr, "the main process relearned data-parallel"
    assert shared in done.stderr, "the second process took its share"
    assert done.stdout.count("validated, every budget met") == 1, "only the main process exports"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["method"] == method
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
