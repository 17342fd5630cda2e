"""Relearning scales out on accelerate: two CPU processes (gloo) under torchrun, one export.

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
def test_basel_export_relearns_on_two_processes(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml", precision="fp32")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--module", "exporter.cli",
               "export", "--device", str(profile), "--model", str(tiny_model_dir),
               "--method", "basel", "--out", str(out), "--calibration-samples", "4", "--calibration-seq-len", "32"]
    env = {**os.environ, "EDGESLIM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr, "relearning ran data-parallel on both processes"
    assert done.stdout.count("validated, every budget met") == 1, "only the main process exports"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["method"] == "basel"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
