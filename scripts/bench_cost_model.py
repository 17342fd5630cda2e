"""Benchmark: the planner's cost model against onnxruntime on this machine, side by side in one run.

For each precision and keep ratio it exports the real default model (SmolLM2-135M-Instruct), measures file size,
peak session memory, prefill and decode latency in a fresh onnxruntime process, and prints them next to the
cost model's prediction for this machine (bandwidth and compute measured here first). Ratios near 1 mean the
device predictions can be trusted as far as the roofline's assumptions hold; memory should be an upper bound.

    python scripts/bench_cost_model.py [--precisions fp32,int8,int4] [--keep 1.0,0.6] [--prefill 256 --context 1024]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
from pathlib import Path

import torch

from exporter.contracts import MIB, RankPlan
from exporter.export import export_model
from exporter.factorize import factorize_
from exporter.models import describe, load_model
from exporter.plan import layers_at, predict
from exporter.select import get_method
from exporter.validate import host_figures, measure_session


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--keep", default="1.0,0.6")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    loaded = load_model(None)
    spec = describe(loaded.model)
    host = host_figures(args.threads)
    print(f"machine: {platform.platform()}, {host['cpus']} cpus, threads {args.threads}, "
          f"measured {host['memory_bandwidth_gbps']} GB/s, {host['compute_gflops']} GFLOP/s, "
          f"{host['op_overhead_us']} µs/node")
    print(f"model: {loaded.name}, prefill {args.prefill} tokens, context {args.context}")
    header = ("precision", "keep", "file MiB (pred/meas)", "memory MiB (pred/meas)", "decode ms (pred/meas)",
              "prefill ms (pred/meas)")
    print(" | ".join(header))
    for keep in (float(k) for k in args.keep.split(",")):
        model = copy.deepcopy(loaded.model)
        layers = layers_at(spec, keep, 8)
        plan = RankPlan("bench", "fp32", keep, 8, layers, None, None)  # predictions filled per precision below
        torch.set_num_threads(1)
        factorize_(model, plan, get_method("svd"), {})
        torch.set_num_threads(args.threads)
        for precision in args.precisions.split(","):
            with tempfile.TemporaryDirectory() as folder:
                artifact = export_model(model, loaded.tokenizer, spec, Path(folder), precision, args.context)
                measured = measure_session(artifact.model_file, "CPUExecutionProvider", args.threads,
                                           args.prefill, args.context)
            predicted = predict(spec, [layer.params for layer in layers], precision=precision,
                                context_length=args.context, prefill_tokens=args.prefill,
                                bandwidth_gbps=host["memory_bandwidth_gbps"], compute_gflops=host["compute_gflops"],
                                op_overhead_us=host["op_overhead_us"])
            print(" | ".join([
                precision, f"{keep:.2f}",
                f"{predicted.weights_bytes / MIB:.0f}/{artifact.file_bytes / MIB:.0f}",
                f"{predicted.memory_bytes / MIB:.0f}/{measured.peak_memory_bytes / MIB:.0f}",
                f"{predicted.decode_ms_per_token:.1f}/{measured.decode_ms_per_token:.1f}",
                f"{predicted.prefill_ms:.0f}/{measured.prefill_ms:.0f}",
            ]), flush=True)


if __name__ == "__main__":
    main()
