"""Latency and peak memory of an ONNX model in onnxruntime, measured in a fresh process.

Run as `python -m exporter.measure MODEL --provider P --threads N --prefill-tokens T --context C`; prints one JSON
object. A fresh process is the only honest way to read a session's peak memory: the parent holds PyTorch and the
model. Memory is the growth of the process's peak resident set (VmHWM) above its peak before the session was
created, so it includes the weights as loaded, the runtime's arena, a prefill of T tokens and a decode step with
the KV cache full at C tokens (the inputs that hold that cache are counted too: an app holds them).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

DECODE_STEPS = 16


def _peak_rss_bytes() -> int:
    """VmHWM: this process's peak resident set. (getrusage's ru_maxrss would carry the parent's peak over
    fork+exec, and the parent holds PyTorch and the model.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: an upper bound


def session(model: str, provider: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(model, options, providers=providers)


def kv_layout(sess: ort.InferenceSession) -> tuple[list[str], int, int]:
    """(past input names, kv heads, head dim) read from the graph's declared input shapes."""
    names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    shape = next(i.shape for i in sess.get_inputs() if i.name == names[0])
    return names, int(shape[1]), int(shape[3])


def feed(ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
        "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None].repeat(batch, 0),
        **past,
    }


def empty_past(names: list[str], heads: int, head_dim: int, length: int = 0) -> dict[str, np.ndarray]:
    return {name: np.zeros((1, heads, length, head_dim), dtype=np.float32) for name in names}


def measure(model: str, provider: str, threads: int, prefill_tokens: int, context: int, runs: int) -> dict:
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    sess = session(model, provider, threads)
    load_ms = 1e3 * (time.perf_counter() - start)
    names, heads, head_dim = kv_layout(sess)
    vocab = int(sess.get_outputs()[0].shape[2])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(1, prefill_tokens), dtype=np.int64)
    outputs = [o.name for o in sess.get_outputs()]

    prefill_times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = sess.run(outputs, feed(ids, empty_past(names, heads, head_dim), 0))
        prefill_times.append(1e3 * (time.perf_counter() - start))

    decode_times, past_len = [], prefill_tokens
    past = dict(zip(names, out[1:], strict=True))
    token = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        out = sess.run(outputs, feed(token, past, past_len))
        decode_times.append(1e3 * (time.perf_counter() - start))
        past = dict(zip(names, out[1:], strict=True))
        token = np.array([[int(out[0][0, -1].argmax())]], dtype=np.int64)
        past_len += 1
    del past, out
    full = empty_past(names, heads, head_dim, context - 1)
    sess.run(outputs, feed(token, full, context - 1))  # the KV cache at its largest
    return {
        "provider": sess.get_providers()[0],
        "threads": threads,
        "prefill_tokens": prefill_tokens,
        "prefill_ms": statistics.median(prefill_times),
        "decode_ms_per_token": statistics.median(decode_times),
        "peak_memory_bytes": _peak_rss_bytes() - baseline,
        "load_ms": load_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--prefill-tokens", type=int, required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    result = measure(args.model, args.provider, args.threads, args.prefill_tokens, args.context, args.runs)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
