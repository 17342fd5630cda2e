"""Benchmark: what edgeslim ships for every device profile, next to the dense int4 model that onnxruntime-genai's
model builder makes from the same checkpoint, measured side by side in one run through onnxruntime.

For each model: bytes on disk, graph nodes, held-out target-task perplexity (the first --tokens tokens of the task's
held-out split, in windows of 512 tokens or the shortest context among the profiles, the same for every model),
prefill of a 256-token prompt and decode ms/token
at 1 and 2 threads (median of interleaved rounds), and peak resident memory of a fresh process running a prefill and
a decode step with the KV cache full (one shared past/present buffer per layer, as onnxruntime-genai runs both
graphs) at the context and prompt length of the profile the graph was built for (the builder's: --peer-context and
256 tokens).
The peer comes from

    python -m onnxruntime_genai.models.builder -i <the default model as a Hugging Face folder> -p int4 -e cpu

run with --peer-python (a Python whose onnxruntime-genai 0.18 and transformers 5 cannot share edgeslim's
environment: transformers is pinned to 4.57 here; see README, "Benchmark: what ships, against the peer").

    python scripts/bench_vs_peers.py --peer-python .peer/bin/python [--profiles phone,wearable] [--task code]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from exporter.cache import TensorCache
from exporter.calibration import calibration_batches
from exporter.collect import cached_activation_stats
from exporter.contracts import MIB, RankPlan
from exporter.export import artifact_bytes, export_model, save_variant
from exporter.factorize import factorize_
from exporter.graph import all_positions
from exporter.measure import SharedCache, prefill_and_decode, session
from exporter.models import (
    DEFAULT_MODEL_NAME,
    cache_dir,
    default_gguf,
    describe,
    gguf_to_safetensors,
    lm_head_name,
    load_model,
)
from exporter.plan import layers_at, predict_for_device
from exporter.profile import load_profile, shipped_profiles
from exporter.quality import heldout_tokens, log_softmax_rows, window_logits
from exporter.quantize import quantize_model
from exporter.select import get_method
from exporter.tasks import data_dir, get_task

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"
PEER_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = 256
DECODE_STEPS = 32
ROUNDS = 3


def build_peer(python: str, folder: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-m", PEER_HUB_NAME, "-i", str(folder),
                    "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out / "cache")],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def export(profile: Path, task: str, out: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "export", "--device", str(profile), "--task", task,
                           "--out", str(out)], capture_output=True, text=True, check=False, cwd=ROOT)
    seconds = time.perf_counter() - start
    folder = out if out.exists() else out.with_name(out.name + ".failed")
    report = json.loads((folder / "report.json").read_text())
    report["exit_code"], report["folder"] = done.returncode, str(folder)
    return seconds, report


def perplexity(model_file: str, ids: list[int], window: int, head_dim: int) -> float:
    sess = session(model_file, "CPUExecutionProvider", os.cpu_count() or 1)
    nll = count = 0.0
    for _, logits, targets in window_logits(sess, ids, window, head_dim):
        for rows, log_probs in log_softmax_rows(logits):
            nll -= float(log_probs[np.arange(len(targets[rows])), targets[rows]].sum())
        count += len(targets)
    return float(np.exp(nll / count))


def speed(model_file: str, threads: int, context: int, head_dim: int) -> tuple[float, float]:
    """(prefill ms of a PROMPT-token prompt, median decode ms/token) with the shared KV buffer."""
    cache = SharedCache(session(model_file, "CPUExecutionProvider", threads), context, head_dim)
    ids = np.random.default_rng(0).integers(0, 1000, size=(1, PROMPT), dtype=np.int64)
    prefill, steps, _ = prefill_and_decode(cache, ids, 1, DECODE_STEPS)
    return prefill[0], statistics.median(steps)


def peak_memory(model_file: str, threads: int, context: int, prompt: int, head_dim: int) -> float:
    done = subprocess.run([sys.executable, "-m", "exporter.measure", model_file, "--threads", str(threads),
                           "--prefill-tokens", str(prompt), "--context", str(context), "--head-dim", str(head_dim)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["peak_memory_bytes"] / MIB


def svdllm_nearest(loaded, row: dict, task: str, work: Path) -> dict:
    """The published baseline at the same bytes as a compressed export: SVD-LLM with one keep ratio for every
    projection (the largest whose file is no bigger), weights rounded to nearest, the same graph and context."""
    report = json.loads((Path(row["file"]).parent / "report.json").read_text())
    profile = load_profile(ROOT / "device_profiles" / f"{report['profile']['name']}.yaml")
    spec = describe(loaded.model)
    target = artifact_bytes(Path(row["file"]))
    low, high = 0.0, 1.0
    for _ in range(30):  # the largest uniform keep ratio whose predicted file fits the export's bytes
        mid = (low + high) / 2
        fits = predict_for_device(spec, layers_at(spec, mid, 32), profile).weights_bytes <= target
        low, high = (mid, high) if fits else (low, mid)
    layers = layers_at(spec, low, 32)
    calibration = calibration_batches(loaded.tokenizer, get_task(task).calibration(data_dir()), 16, 256, 0)
    names = [layer.name for layer in spec.layers] + [lm_head_name(loaded.model)]
    stats = cached_activation_stats(loaded.model, loaded.fingerprint, calibration, names,
                                    TensorCache(cache_dir() / "tensors"))
    model = copy.deepcopy(loaded.model)
    factorize_(model, RankPlan("baseline", "int4", low, 32, layers, None, None), get_method("svdllm"), stats)
    folder = work / f"svdllm-nearest-{profile.name}"
    folder.mkdir(exist_ok=True)
    artifact = export_model(model, loaded.tokenizer, spec, folder, "int4", profile.context_length,
                            quantize_model(model), row["activations"], profile.kv_cache_precision)
    keep = sum(layer.params for layer in layers) / sum(layer.params for layer in spec.layers)
    return dict(name=f"SVD-LLM + round-to-nearest, {profile.name}'s bytes", file=Path(artifact.model_file),
                all=Path(artifact.all_positions_file), context=profile.context_length,
                prompt=profile.prefill_tokens, seconds=float("nan"), kv=profile.kv_cache_precision,
                plan=f"{keep:.0%} of projections kept, all vocabulary rows", passed="", activations=row["activations"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default=sys.executable, help="a Python with onnxruntime-genai 0.18")
    parser.add_argument("--profiles", default=",".join(p.stem for p in shipped_profiles()))
    parser.add_argument("--task", default="code")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--peer-context", type=int, default=1024)
    parser.add_argument("--out", default=None, help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the last table")
    args = parser.parse_args()
    if args.replot:
        replot(args.task, args.tokens)
        return
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-vs-peers-"))
    work.mkdir(parents=True, exist_ok=True)

    loaded = load_model(None)
    ids = heldout_tokens(get_task(args.task), loaded.tokenizer, data_dir(), args.tokens)
    config = loaded.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    hf_folder, _ = gguf_to_safetensors(default_gguf())
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus; model {DEFAULT_MODEL_NAME}; held-out "
          f"{len(ids)} {args.task} tokens; prompt {PROMPT} tokens, {DECODE_STEPS} decode steps, {ROUNDS} rounds")

    rows = []
    peer = work / "peer-int4"
    seconds = build_peer(args.peer_python, hf_folder, peer)
    rows.append(dict(name="onnxruntime-genai builder, dense int4", file=peer / "model.onnx", all=peer / "model.onnx",
                     context=args.peer_context, prompt=PROMPT, seconds=seconds, kv="fp32", plan="dense", passed="",
                     activations="int8"))
    for name in args.profiles.split(","):
        profile = load_profile(ROOT / "device_profiles" / f"{name}.yaml")
        seconds, report = export(ROOT / "device_profiles" / f"{name}.yaml", args.task, work / name)
        folder = Path(report["folder"])
        twin = folder / "bench-all-positions.onnx"
        save_variant(all_positions(onnx.load(folder / "model.onnx", load_external_data=False)), twin)
        plan = report["plan"]
        vocabulary = "all" if plan["vocabulary"] is None else f"{plan['vocabulary']:,}"
        summary = ("dense" if plan["allocation"] == "dense" else
                   f"{plan['keep_ratio']:.0%} of projections kept, {vocabulary} vocabulary rows")
        rows.append(dict(name=f"edgeslim, {name} ({profile.precision}, {plan['activations']} activations)",
                         activations=plan["activations"],
                         file=folder / "model.onnx", all=twin, context=profile.context_length,
                         prompt=profile.prefill_tokens, seconds=seconds,
                         kv=profile.kv_cache_precision, plan=summary,
                         passed="yes" if report["exit_code"] == 0 else f"no: {report['failures'][0][:60]}"))

    window = min(512, *(row["context"] for row in rows))  # the same windows for every model
    rows += [svdllm_nearest(loaded, row, args.task, work) for row in list(rows[1:]) if row["plan"] != "dense"]
    for row in rows:
        row["bytes"] = artifact_bytes(Path(row["file"])) / 1e6
        row["nodes"] = len(onnx.load(row["file"], load_external_data=False).graph.node)
        row["ppl"] = perplexity(str(row["all"]), ids, window, head_dim)
        row["peak"] = peak_memory(str(row["file"]), 2, row["context"], row["prompt"], head_dim)
        print(f"measured {row['name']}", flush=True)
    for threads in (1, 2):
        timings = {row["name"]: [] for row in rows}
        for _ in range(ROUNDS):  # interleaved, so a busy moment of the machine hits every model alike
            for row in rows:
                if row["context"] >= 2 * PROMPT:
                    timings[row["name"]].append(speed(str(row["file"]), threads, row["context"], head_dim))
        for row in rows:
            got = timings[row["name"]]
            row[f"prefill{threads}"] = statistics.median(t[0] for t in got) if got else None
            row[f"decode{threads}"] = statistics.median(t[1] for t in got) if got else None
    write(rows, args, len(ids))


def write(rows: list[dict], args, tokens: int) -> None:
    peer = rows[0]
    header = ["model", "plan", "MB on disk", "nodes", f"held-out {args.task} ppl", "ppl / peer's",
              "peak MiB (context, prompt)",
              "prefill ms 1 / 2 threads", "decode ms/token 1 / 2 threads", "built in s", "export passed"]

    def ms(row, kind):
        values = [row.get(f"{kind}{t}") for t in (1, 2)]
        return "n/a (context < 512)" if values[0] is None else " / ".join(f"{v:.1f}" for v in values)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["name"], row["plan"], f"{row['bytes']:.1f}", str(row["nodes"]), f"{row['ppl']:.2f}",
            f"{row['ppl'] / peer['ppl']:.3f}", f"{row['peak']:.0f} ({row['context']}, {row['prompt']}, {row['kv']} KV)",
            ms(row, "prefill"), ms(row, "decode"), "" if row["seconds"] != row["seconds"] else f"{row['seconds']:.0f}",
            row["passed"]]) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_vs_peers_{args.task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot([(row["name"], row["bytes"], row["ppl"]) for row in rows], args.task, tokens)


def plot(points: list[tuple[str, float, float]], task: str, tokens: int) -> None:
    """Perplexity against size, one marker per model (the first is the peer), sizes and perplexities on log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    markers = "s^v<>DpPhX*o"
    for (name, size, perplexity), marker in zip(points, markers, strict=False):
        axis.scatter(size, perplexity, s=60, marker=marker, label=name)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("MB on disk (log)")
    axis.set_ylabel(f"held-out {task} perplexity, {tokens} tokens (log)")
    axis.set_title("what ships: edgeslim per device profile vs the dense int4 peer")
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(RESULTS / f"bench_vs_peers_{task}.png", dpi=120)


def replot(task: str, tokens: int) -> None:
    """The plot again from the table the last run wrote."""
    lines = (RESULTS / f"bench_vs_peers_{task}.md").read_text().splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    plot([(row[0], float(row[2]), float(row[4])) for row in cells], task, tokens)


if __name__ == "__main__":
    main()
