"""Benchmark: the planner's cost model against onnxruntime on this machine, side by side in one run.

For dense and factorized plans of the real default model (SmolLM2-135M-Instruct), each compute mode (what int4
matmuls compute with) and KV-cache precision, it builds the graph, measures file size, peak session memory (prefill
and a decode step with the shared KV buffer full), prefill and decode latency in a fresh onnxruntime process, and
prints them next to the cost model's prediction for this machine (bandwidth and compute measured here first).
Memory must be predicted within a few percent: it is judged on measurement, and plans keep a margin for the error
(plan.MEMORY_MARGIN); latency ratios show how far the roofline's assumptions hold.

    python scripts/bench_cost_model.py [--keep 1.0,0.5] [--modes int8,fp32] [--kv fp32,fp16]
        [--shapes 1024:256,512:64]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from bench_graph import factorized

from exporter.contracts import MIB
from exporter.export import artifact_bytes, write_decoder
from exporter.graph import GraphOptions
from exporter.models import describe, load_model
from exporter.plan import predict
from exporter.validate import host_figures, measure_session


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", default="1.0,0.5")
    parser.add_argument("--modes", default="int8,int8 (lm_head fp32),fp32")
    parser.add_argument("--kv", default="fp32,fp16")
    parser.add_argument("--shapes", default="1024:256,512:64", help="context:prompt pairs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    loaded = load_model(None)
    spec = describe(loaded.model)
    host = host_figures(args.threads)
    print(f"machine: {platform.platform()}, {host['cpus']} cpus, threads {args.threads}, "
          f"measured {host['memory_bandwidth_gbps']} GB/s, {host['compute_gflops']} GFLOP/s, "
          f"{host['op_overhead_us']} µs/node")
    print(f"model: {loaded.name}; int4 weights rounded to nearest; prompt and context per row")
    header = ("kept", "activations", "KV", "context:prompt", "file MiB (pred/meas)", "memory MiB (pred/meas)",
              "memory error", "decode ms (pred/meas)", "prefill ms (pred/meas)")
    print(" | ".join(header))
    contexts = [tuple(int(x) for x in shape.split(":")) for shape in args.shapes.split(",")]
    for keep in (float(k) for k in args.keep.split(",")):
        model, layers, quantized = factorized(loaded, spec, keep)
        for mode in args.modes.split(","):
            for kv in args.kv.split(","):
                with tempfile.TemporaryDirectory() as folder:
                    path = Path(folder) / "model.onnx"
                    write_decoder(path, model, spec, GraphOptions(max(c for c, _ in contexts), mode, kv), quantized)
                    for context, prompt in contexts:
                        measured = measure_session(str(path), "CPUExecutionProvider", args.threads, prompt, context)
                        predicted = predict(spec, layers, precision="int4", context_length=context,
                                            prefill_tokens=prompt, bandwidth_gbps=host["memory_bandwidth_gbps"],
                                            compute_gflops=host["compute_gflops"],
                                            op_overhead_us=host["op_overhead_us"], activations=mode, kv_cache=kv)
                        error = predicted.memory_bytes / measured.peak_memory_bytes - 1
                        print(" | ".join([
                            f"{keep:.2f}", mode, kv, f"{context}:{prompt}",
                            f"{predicted.weights_bytes / MIB:.1f}/{artifact_bytes(path) / MIB:.1f}",
                            f"{predicted.memory_bytes / MIB:.0f}/{measured.peak_memory_bytes / MIB:.0f}",
                            f"{error:+.1%}",
                            f"{predicted.decode_ms_per_token:.1f}/{measured.decode_ms_per_token:.1f}",
                            f"{predicted.prefill_ms:.0f}/{measured.prefill_ms:.0f}",
                        ]), flush=True)


if __name__ == "__main__":
    main()
