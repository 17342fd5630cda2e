"""Evaluation grid: model x task x budget, each cell an `edgeslim export --eval` run, as a table and a plot.

For every model, task and device profile (the profile is the budget), it runs the real command
`edgeslim export --device PROFILE --model MODEL --task TASK --eval TASK:N` in a fresh process and reads the
report.json it wrote: the shipped file's size, the kept fraction, and the task metric of the dense model, the
compressed PyTorch model and the shipped ONNX model on the same N items. Writes
scripts/results/eval_grid.md and eval_grid.png (size vs task metric, one line per model and task, dense marked).

    python scripts/eval_grid.py [--models default] [--tasks gsm8k,mbpp] \\
        [--devices phone-flagship,phone,wearable] [--items 20] [--max-new-tokens 192] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
HEADER = ["model", "task", "device", "kept", "file MiB", "metric", "dense", "compressed (PyTorch)",
          "shipped (onnxruntime)", "same completions", "answer ppl dense", "answer ppl shipped", "minutes"]


def cell(model: str, task: str, device: str, items: int, max_new_tokens: int, workdir: Path) -> list[str]:
    out = workdir / f"{Path(model).stem}-{task}-{device}"
    command = [sys.executable, "-m", "exporter.cli", "export", "--device", str(ROOT / "device_profiles" /
               f"{device}.yaml"), "--task", task, "--eval", f"{task}:{items}", "--max-new-tokens",
               str(max_new_tokens), "--out", str(out)]
    if model != "default":
        command += ["--model", model]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    minutes = (time.perf_counter() - start) / 60
    report_file = out / "report.json" if done.returncode == 0 else Path(f"{out}.failed") / "report.json"
    if not report_file.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [model, task, device] + [""] * (len(HEADER) - 4) + [f"failed: {tail}"]
    return summarize(json.loads(report_file.read_text()), model, task, device, minutes)


def summarize(report: dict, model: str, task: str, device: str, minutes: float) -> list[str]:
    """One table row from an export's report.json."""
    dense, compressed, shipped = report["evaluations"][0]["models"]
    same = sum(a["completion"] == b["completion"] for a, b in zip(compressed["items"], shipped["items"], strict=True))
    return [model, task, device, f"{report['plan']['keep_ratio']:.0%}",
            f"{report['artifact']['file_bytes'] / 2**20:.1f}", dense["metric"], _score(dense), _score(compressed),
            _score(shipped), f"{same}/{len(shipped['items'])}", f"{dense['perplexity']:.2f}",
            f"{shipped['perplexity']:.2f}", f"{minutes:.1f}"]


def _score(model: dict) -> str:
    value = model["score"] if model["score"] is not None else model["perplexity"]
    return f"{value:.1%}" if model["score"] is not None else f"ppl {value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="default", help="comma-separated; 'default' is the embedded model")
    parser.add_argument("--tasks", default="gsm8k,mbpp")
    parser.add_argument("--devices", default="phone-flagship,phone,wearable")
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--out", default=None, help="keep every cell's export folder here (default: discarded)")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus; {args.items} items per task, greedy, "
          f"<= {args.max_new_tokens} new tokens; each cell one `edgeslim export --eval` in a fresh process")
    print(" | ".join(HEADER), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeslim-grid-") as scratch:
        workdir = Path(args.out or scratch)
        for model in args.models.split(","):
            for task in args.tasks.split(","):
                for device in args.devices.split(","):
                    rows.append(cell(model, task, device, args.items, args.max_new_tokens, workdir))
                    print(" | ".join(rows[-1]), flush=True)
    write(rows)


def write(rows: list[list[str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)] + ["| " + " | ".join(r) + " |" for r in rows]
    (RESULTS / "eval_grid.md").write_text("\n".join(table) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r[0], r[1]) for r in rows if r[4] and "%" in r[8]):
        points = sorted((float(r[4]), float(r[8].rstrip("%"))) for r in rows if (r[0], r[1]) == key and r[4])
        line = axis.plot(*zip(*points, strict=True), marker="o", label=f"{key[0]} {key[1]} (shipped)")[0]
        dense = next(float(r[6].rstrip("%")) for r in rows if (r[0], r[1]) == key and r[4])
        axis.axhline(dense, color=line.get_color(), linestyle="--", linewidth=1)
    axis.set_xlabel("shipped model file (MiB)")
    axis.set_ylabel("task metric (%): exact match / pass@1; dashed: dense")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "eval_grid.png", dpi=120)
    print("\n".join(table))


if __name__ == "__main__":
    main()
