"""Benchmark: how an export's peak memory and time on this machine grow with the model's size.

Synthetic Llama-shaped checkpoints (random weights, safetensors in bf16 as published checkpoints are, a small BPE
tokenizer) with the widths and vocabularies of real models and a few decoder blocks each; every one is
exported by the real command in a fresh process (`edgeslim export`, int4, a budget it fits dense, so every stage
runs: load, activations, GPTQ, graph, parity, measurement, held-out quality) and its peak resident memory (the
largest of the process and its helpers, wait4's ru_maxrss: not their sum, and the process measuring the shipped
graph runs beside the exporter) and wall time are recorded next to what the pipeline's memory model
(exporter.footprint) predicts. One shape is also run at twice the blocks, to show how the peak grows per block;
`--layers 24 --shapes qwen2-0.5b` runs that shape at its real depth, where the statistics outweigh the weights.

    python scripts/bench_scale.py [--shapes smollm2-135m,qwen2-0.5b,llama-3.2-1b,llama-3.2-3b,llama-2-7b]
                                  [--layers 2] [--streaming] [--out scripts/results/bench_scale.md]

The plot (scripts/results/bench_scale.png) is drawn from the four result tables (in memory and streamed, 2 blocks
and real depth: bench_scale{,_depth,_streamed,_streamed_depth}.md) when they all exist.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from exporter.footprint import BASE_BYTES, FP32_COPIES, STREAM_BASE_BYTES, STREAM_COPIES, checkpoint_footprint
from exporter.synthetic import SHAPES, llama_config, write_checkpoint

GB = 1e9
RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = {
    "name": "bench-scale", "description": "a budget every shape fits dense: the export's own cost is measured",
    "execution_providers": ["CPUExecutionProvider"], "threads": 2, "precision": "int4", "context_length": 256,
    "memory_budget_mib": 1 << 20, "latency": {"decode_ms_per_token": 1e6, "prefill_ms": 1e7, "prefill_tokens": 64},
    "hardware": {"memory_bandwidth_gbps": 10, "compute_gflops": 50}, "quality": {"max_ppl_ratio": 10},
}


def synthetic(name: str, layers: int, folder: Path) -> Path:
    """A random checkpoint of `name`'s shape with `layers` blocks (bf16 shards, a block per shard)."""
    hidden, intermediate, heads, kv_heads, vocab, tied, _ = SHAPES[name]
    return write_checkpoint(llama_config(hidden, intermediate, heads, kv_heads, vocab, tied, layers),
                            folder / f"{name}-{layers}")


def export(model: Path, profile: Path, out: Path, streaming: bool) -> tuple[float, float]:
    """(peak resident GB of the export and its helper processes, wall seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "exporter.cli", "export", "--device", str(profile), "--model",
                                str(model), "--out", str(out), "--no-cache",
                                "--layer-streaming" if streaming else "--in-memory"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export of {model.name} failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024 / GB, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--streaming", action="store_true", help="export a block at a time (--layer-streaming)")
    parser.add_argument("--out", default=str(RESULTS / "bench_scale.md"))
    args = parser.parse_args()
    runs = [(name, args.layers) for name in args.shapes.split(",")]
    if len(runs) > 1:  # the first shape at twice the blocks too: the per-block growth
        runs.insert(1, (runs[0][0], 2 * args.layers))
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GB:.0f} GB; torch {torch.__version__}",
             f"export {'a block at a time (--layer-streaming)' if args.streaming else 'in memory (--in-memory)'}; "
             "fp32 GB: of what the export holds (streamed: the largest block and the tables outside the blocks); "
             "statistics GB: the rest of the model's prediction (Gram matrices; streamed: one block's and the "
             "calibration states, or the whole int4 model in the measuring process where that is more)",
             "", "| shape | blocks | parameters | fp32 GB | statistics GB | peak GB (measured) | peak GB (model) | "
             "export s (measured) | export s (model) | work TFLOP |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    measured = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
        profile = Path(work) / "profile.yaml"
        profile.write_text(yaml.safe_dump(PROFILE))
        for name, layers in runs:
            model = synthetic(name, layers, Path(work))
            shape = checkpoint_footprint(model)
            peak, seconds = export(model, profile, Path(work) / f"out-{name}-{layers}", args.streaming)
            fp32 = 4 * (shape.streamed_parameters if args.streaming else shape.parameters) / GB
            predicted = shape.streamed_peak_bytes if args.streaming else shape.peak_bytes
            base, copies = (STREAM_BASE_BYTES, STREAM_COPIES) if args.streaming else (BASE_BYTES, FP32_COPIES)
            statistics = max(0.0, (predicted - base - copies * fp32 * GB) / GB)
            predicted_seconds = shape.streamed_seconds if args.streaming else shape.seconds
            row = (f"| {name} | {layers} | {shape.parameters / 1e9:.2f} B | {fp32:.2f} | {statistics:.2f} "
                   f"| {peak:.2f} | {predicted / GB:.2f} | {seconds:.0f} | {predicted_seconds:.0f} | "
                   f"{shape.work_flops / 1e12:.2f} |")
            lines.append(row)
            measured.append((fp32, peak - statistics, shape.work_flops / 1e12, seconds))
            print(row, flush=True)
            shutil.rmtree(model)
            shutil.rmtree(Path(work) / f"out-{name}-{layers}")
    if len(measured) > 2:
        lines += ["", fit("peak GB - statistics GB", [(f, p) for f, p, _, _ in measured], "fp32 GB"),
                  fit("export s", [(t, s) for _, _, t, s in measured], "work TFLOP"),
                  "(the model's columns use exporter/footprint.py's constants, which are set from such fits)"]
        print("\n".join(lines[-4:]))
    Path(args.out).write_text("\n".join(lines) + "\n")
    tables = {"in memory": [RESULTS / "bench_scale.md", RESULTS / "bench_scale_depth.md"],
              "a block at a time": [RESULTS / "bench_scale_streamed.md", RESULTS / "bench_scale_streamed_depth.md"]}
    if all(table.exists() for files in tables.values() for table in files):
        plot(tables, RESULTS / "bench_scale.png")


def plot(tables: dict[str, list[Path]], out: Path) -> None:
    """Peak memory and wall time against parameters, one line per way of exporting, from its result tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label, files in tables.items():
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for table in files
                for line in table.read_text().splitlines() if line.startswith("| ") and not line.startswith("| shape")]
        points = sorted((float(r[2].split()[0]), float(r[5]), float(r[7]), f"{r[0]} x{r[1]}") for r in rows)
        memory.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        time_axis.plot([p[0] for p in points], [p[2] for p in points], "o-", label=label)
        for parameters, peak, _, name in points:  # the peak follows a block's width, not the parameter count
            memory.annotate(name, (parameters, peak), fontsize=6, xytext=(3, 3), textcoords="offset points")
    memory.set(xlabel="parameters exported (B)", ylabel="peak resident GB", title="memory")
    time_axis.set(xlabel="parameters exported (B)", ylabel="wall s (2 cores)", title="time")
    memory.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def fit(what: str, points: list[tuple[float, float]], per: str) -> str:
    """Least squares y = a + b x: what exporter.footprint's constants are set from."""
    slope, intercept = np.polyfit([x for x, _ in points], [y for _, y in points], 1)
    return f"fit: {what} = {intercept:.2f} + {slope:.2f} x {per}"


if __name__ == "__main__":
    main()
