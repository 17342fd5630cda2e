"""Benchmark: the graph itself, against onnxruntime-genai's builder, and what factorization buys at decode.

Side by side in one run on this machine, at 1 and 2 threads, every model with the builder's settings (int4 weights,
int8 activations, fp32 KV cache in one shared past/present buffer of --context positions, a 256-token prompt):
the builder's dense int4 model of the default checkpoint, edgeslim's dense int4 graph, and edgeslim graphs with
every projection factorized at a few keep ratios (plain SVD ranks: speed does not depend on which bases are kept).

Columns: nodes; MB on disk; MB a decode step reads (the weights, the tied table once for the lm_head, and the KV
cache up to position 256); prefill ms; decode ms/token (median of interleaved rounds); decode at this machine's
memory-bandwidth roofline (bytes read / bandwidth measured here) as a share of the measured decode; the share of
the ideal speedup a factorized graph reaches against edgeslim's dense one ((dense ms / its ms) / (dense bytes / its
bytes)); peak resident memory measured (fresh process: prefill, then a decode step with the cache full) next to the
planner's prediction; seconds to build the graph (edgeslim) or the whole model (builder).

    python scripts/bench_graph.py --peer-python .peer/bin/python [--keep 0.8,0.6,0.4] [--context 1024]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import torch
from bench_vs_peers import PROMPT, RESULTS, ROUNDS, build_peer, peak_memory, speed

from exporter.contracts import MIB, RankPlan
from exporter.export import artifact_bytes, write_decoder
from exporter.factorize import factorize_
from exporter.graph import GraphOptions
from exporter.models import default_gguf, describe, gguf_to_safetensors, load_model
from exporter.plan import layers_at, predict
from exporter.quantize import quantize_model
from exporter.select import get_method
from exporter.validate import host_figures


def factorized(loaded, spec, keep: float):
    """The default model with every projection at `keep` of its break-even rank (plain SVD; dense at keep >= 1) and
    its weights rounded to int4 (nearest): (model, plan layers, int4 weights)."""
    model = copy.deepcopy(loaded.model)
    layers = layers_at(spec, keep, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # SVD on a busy 2-core machine: 1 thread is many times faster
    factorize_(model, RankPlan("bench", "int4", keep, 32, layers, None, None), get_method("svd"), {})
    quantized = quantize_model(model)
    torch.set_num_threads(threads)
    return model, layers, quantized


def decode_bytes(path: Path, spec, position: int) -> int:
    """What one decode step reads: every weight once (a tied table is read by the lm_head) and the KV cache."""
    kv = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4 * position
    return artifact_bytes(path) + kv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", required=True, help="a Python with onnxruntime-genai 0.18")
    parser.add_argument("--keep", default="0.8,0.6,0.4")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-graph-"))
    loaded = load_model(None)
    spec = describe(loaded.model)
    hosts = {threads: host_figures(threads) for threads in (1, 2)}
    print(f"machine: {platform.platform()}, {hosts[1]['cpus']} cpus; measured bandwidth "
          f"{hosts[1]['memory_bandwidth_gbps']} / {hosts[2]['memory_bandwidth_gbps']} GB/s at 1 / 2 threads; "
          f"model {loaded.name}; context {args.context}, prompt {PROMPT}, {ROUNDS} interleaved rounds")

    peer = work / "peer"
    rows = [dict(name="onnxruntime-genai builder, dense int4", file=peer / "model.onnx",
                 seconds=build_peer(args.peer_python, gguf_to_safetensors(default_gguf())[0], peer), layers=None)]
    options = GraphOptions(args.context, "int8", "fp32")
    for keep in [1.0, *(float(k) for k in args.keep.split(","))]:
        path = work / f"keep-{keep}" / "model.onnx"
        path.parent.mkdir()
        model, layers, quantized = factorized(loaded, spec, keep)
        start = time.perf_counter()
        write_decoder(path, model, spec, options, quantized)
        seconds = time.perf_counter() - start
        name = "edgeslim, dense int4" if keep >= 1 else f"edgeslim, projections factorized at {keep:.0%}"
        rows.append(dict(name=name, file=path, seconds=seconds, layers=layers))

    for row in rows:
        row["nodes"] = len(onnx.load(row["file"], load_external_data=False).graph.node)
        row["mb"] = artifact_bytes(row["file"]) / 1e6
        row["reads"] = decode_bytes(row["file"], spec, PROMPT)
        row["peak"] = peak_memory(str(row["file"]), 2, args.context, PROMPT, spec.head_dim)
        row["predicted"] = None if row["layers"] is None else predict(
            spec, row["layers"], precision="int4", context_length=args.context, prefill_tokens=PROMPT,
            bandwidth_gbps=1, compute_gflops=1, op_overhead_us=0, activations="int8",
            kv_cache="fp32").memory_bytes / MIB
    for threads in (1, 2):
        timings = {row["name"]: [] for row in rows}
        for _ in range(ROUNDS):  # interleaved: a busy moment of the machine hits every model alike
            for row in rows:
                timings[row["name"]].append(speed(str(row["file"]), threads, args.context, spec.head_dim))
        for row in rows:
            row[f"prefill{threads}"] = statistics.median(t[0] for t in timings[row["name"]])
            row[f"decode{threads}"] = statistics.median(t[1] for t in timings[row["name"]])
            roofline_ms = 1e3 * row["reads"] / (hosts[threads]["memory_bandwidth_gbps"] * 1e9)
            row[f"roofline{threads}"] = roofline_ms / row[f"decode{threads}"]
    write(rows, args)


def write(rows: list[dict], args) -> None:
    dense = rows[1]

    def both(row, key, fmt):
        return " / ".join(format(row[f"{key}{t}"], fmt) for t in (1, 2))

    def ideal(row, threads):
        speedup = dense[f"decode{threads}"] / row[f"decode{threads}"]
        return speedup / (dense["reads"] / row["reads"])

    header = ["graph", "nodes", "MB on disk", "MB read per decode step", "prefill ms 1 / 2 threads",
              "decode ms/token 1 / 2 threads", "bandwidth roofline / measured decode, 1 / 2 threads",
              "share of ideal speedup vs edgeslim dense, 1 / 2 threads", "peak MiB measured (predicted)",
              "built in s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([
            row["name"], str(row["nodes"]), f"{row['mb']:.1f}", f"{row['reads'] / 1e6:.1f}",
            both(row, "prefill", ".0f"), both(row, "decode", ".1f"), both(row, "roofline", ".0%"),
            "" if row["layers"] is None or row is dense else " / ".join(f"{ideal(row, t):.0%}" for t in (1, 2)),
            f"{row['peak']:.0f}" + ("" if row["predicted"] is None else f" ({row['predicted']:.0f})"),
            f"{row['seconds']:.1f}"]) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_graph.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
