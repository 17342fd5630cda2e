"""Benchmark: selection methods compared at equal bytes on the real default model (SmolLM2-135M-Instruct), at the
precision that ships.

For each method and each budget (fraction of the decoder projections' weights kept, the same ranks for every
method, on MatMulNBits' 32-block grid), it compresses the model with calibration data of the target task and
reports, side by side: held-out target-task perplexity (answers given their prompts, from the task's test split)
in fp32 and at int4 exactly as the graph computes it (the PyTorch mirror holding the shipped weights: rounded to
nearest as onnxruntime's quantizer does, and by GPTQ as edgeslim ships), general perplexity (WikiText-2 test) at
int4, top-1 agreement of the int4 model with the dense fp32 model on the target prompts, and the compression's wall
time and peak memory growth. The dense model is a row at fp32 and at int4. Writes a Markdown table and a
size-vs-perplexity plot.

    python scripts/bench_quality.py [--task gsm8k] [--methods svd,asvd,fwsvd,svdllm,taylor,hessian,basel]
        [--keep 0.9,0.8,0.6]

Rows of (method, budget) pairs not rerun are kept from the earlier table in scripts/results/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from exporter.cache import TensorCache
from exporter.calibration import calibration_batches
from exporter.collect import cached_activation_stats
from exporter.contracts import RankPlan
from exporter.evaluate import answer_perplexity, top1_agreement
from exporter.factorize import factorize_
from exporter.models import cache_dir, describe, lm_head_name, load_model
from exporter.plan import layers_at
from exporter.quantize import apply_, quantize_model
from exporter.select import get_method
from exporter.tasks import data_dir, get_task, sample

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def setup(args):
    """Model, data and calibration, the same in every process (seeded samples)."""
    torch.manual_seed(0)
    loaded = load_model(None)
    task, general = get_task(args.task), get_task("wikitext")
    root = data_dir()
    target_pairs = sample(task.heldout(root), args.items, 0)
    general_pairs = sample(general.heldout(root), args.items // 2, 0)
    tokenizer = loaded.tokenizer
    prompts = [tokenizer(p + a, return_tensors="pt").input_ids[:, :256] for p, a in target_pairs[:16]]
    calibration = calibration_batches(tokenizer, task.calibration(root), args.calibration_samples, args.seq_len, 0)
    return loaded, task, target_pairs, general_pairs, prompts, calibration


def int4_models(model, loaded, calibration):
    """The model holding its int4 weights: rounded to nearest, and by GPTQ on the calibration Gram matrices."""
    spec = describe(loaded.model)
    names = [layer.name for layer in spec.layers] + [lm_head_name(loaded.model)]
    grams = cached_activation_stats(loaded.model, loaded.fingerprint, calibration, names,
                                    TensorCache(cache_dir() / "tensors"))
    torch.set_num_threads(1)
    nearest = apply_(copy.deepcopy(model), quantize_model(model))
    rounded = apply_(copy.deepcopy(model), quantize_model(model, grams))
    torch.set_num_threads(os.cpu_count() or 1)
    return nearest, rounded


def one(args) -> None:
    """Compress with one method at one budget in this fresh process; print its row as JSON."""
    loaded, _, target_pairs, general_pairs, prompts, calibration = setup(args)
    dense = loaded.model
    model = copy.deepcopy(dense)
    spec = describe(dense)
    plan = RankPlan("bench", "int4", args.one_keep, 32, layers_at(spec, args.one_keep, 32), None, None)
    names = [layer.name for layer in plan.factorized]
    method = get_method(args.one_method, TensorCache(cache_dir() / "tensors"))
    baseline = peak_rss_mib()
    start = time.perf_counter()
    stats = method.collect(model, calibration, names, ranks={layer.name: layer.rank for layer in plan.factorized})
    torch.set_num_threads(1)  # SVD on 2 threads of a busy machine can be 40x slower than on one
    factorize_(model, plan, method, stats)
    torch.set_num_threads(os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    growth = peak_rss_mib() - baseline
    del stats
    nearest, rounded = int4_models(model, loaded, calibration)
    print(json.dumps(row(args.one_method, f"{args.one_keep:.0%}", model, nearest, rounded, loaded, target_pairs,
                         general_pairs, prompts, f"{seconds:.0f}", f"{growth:.0f}")))


def row(name, kept, model, nearest, rounded, loaded, target_pairs, general_pairs, prompts, seconds="",
        growth="") -> list[str]:
    tokenizer, dense = loaded.tokenizer, loaded.model
    return [name, kept, f"{answer_perplexity(model, tokenizer, target_pairs):.2f}",
            f"{answer_perplexity(nearest, tokenizer, target_pairs):.2f}",
            f"{answer_perplexity(rounded, tokenizer, target_pairs):.2f}",
            f"{answer_perplexity(rounded, tokenizer, general_pairs):.2f}",
            f"{top1_agreement(dense, rounded, prompts):.1%}", seconds, growth]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--methods", default="svd,asvd,fwsvd,svdllm,taylor,hessian,basel")
    parser.add_argument("--keep", default="0.9,0.8,0.6")
    parser.add_argument("--items", type=int, default=48, help="held-out items per perplexity")
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--one-method", help=argparse.SUPPRESS)
    parser.add_argument("--one-keep", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_method:
        one(args)
        return

    loaded, task, target_pairs, general_pairs, prompts, calibration = setup(args)
    dense = loaded.model
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}")
    print(f"model: {loaded.name}; task {task.name}: calibration {calibration.tokens} tokens of train data, "
          f"held-out {len(target_pairs)} test items; general: {len(general_pairs)} WikiText-2 test paragraphs; "
          "each compression in a fresh process (peak = resident-set growth during compression)")
    header = ["method", "kept", "target ppl fp32", "target ppl int4 nearest", "target ppl int4 GPTQ",
              "wikitext ppl int4 GPTQ", "int4 top-1 vs dense fp32", "time s", "peak MiB"]
    rows = [row("dense", "100%", dense, *int4_models(dense, loaded, calibration), loaded, target_pairs, general_pairs,
                prompts)]
    print(" | ".join(header))
    print(" | ".join(rows[0]), flush=True)
    for keep in args.keep.split(","):
        for name in args.methods.split(","):
            command = [sys.executable, __file__, "--task", args.task, "--items", str(args.items),
                       "--calibration-samples", str(args.calibration_samples), "--seq-len", str(args.seq_len),
                       "--one-method", name, "--one-keep", keep]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(" | ".join(rows[-1]), flush=True)
    write(rows, header, task.name)


def merged(rows: list[list[str]], earlier: Path) -> list[list[str]]:
    """This run's rows plus the earlier table's rows for (method, kept) pairs not rerun, so a table can be
    completed one method at a time; sorted by budget, then method."""
    if earlier.exists():
        fresh = {(row[0], row[1]) for row in rows}
        lines = earlier.read_text().splitlines()[2:]
        old = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
        rows = rows + [row for row in old if (row[0], row[1]) not in fresh]
    dense = [row for row in rows if row[0] == "dense"][:1]
    rest = sorted((row for row in rows if row[0] != "dense"), key=lambda r: (-float(r[1].rstrip("%")), r[0]))
    return dense + rest


def write(rows: list[list[str]], header: list[str], task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    rows = merged(rows, RESULTS / f"bench_quality_{task}.md")
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    (RESULTS / f"bench_quality_{task}.md").write_text("\n".join(table) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(row[0] for row in rows[1:]):
        points = [(float(r[1].rstrip("%")), float(r[4])) for r in rows[1:] if r[0] == method]
        axis.plot(*zip(*sorted(points), strict=True), marker="o", label=f"{method} (int4 GPTQ)")
    svdllm = [(float(r[1].rstrip("%")), float(r[3])) for r in rows[1:] if r[0] == "svdllm"]
    if svdllm:
        axis.plot(*zip(*sorted(svdllm), strict=True), marker="x", linestyle=":", color="gray",
                  label="svdllm (int4 nearest)")
    axis.axhline(float(rows[0][4]), color="black", linestyle="--", label="dense int4 GPTQ")
    axis.axhline(float(rows[0][3]), color="gray", linestyle="--", label="dense int4 nearest")
    axis.set_xlabel("decoder projection weights kept (%)")
    axis.set_ylabel(f"{task} held-out perplexity at int4 (log)")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"bench_quality_{task}.png", dpi=120)
    print("\n".join(table))


if __name__ == "__main__":
    main()
