"""Latency and peak memory of an ONNX model in onnxruntime, measured in a fresh process.

Run as `python -m exporter.measure MODEL --provider P --threads N --prefill-tokens T --context C`; prints one JSON
object. A fresh process is the only honest way to read a session's peak memory: the parent holds PyTorch and the
model. Memory is the growth of the process's peak resident set (VmHWM) above its peak before the session was
created, so it includes the weights as loaded, the runtime's arena, the KV cache (one buffer of C positions per
layer, shared by past and present as onnxruntime-genai runs it), a prefill of T tokens and a decode step with the
cache full.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class KVLayout:
    """The past inputs as the graph declares them."""

    names: list[str]
    heads: int
    head_dim: int
    dtype: type  # numpy float32 or float16

    def empty(self, length: int = 0, fill: bool = False) -> dict[str, np.ndarray]:
        """Past tensors of `length` positions; `fill` writes them through (np.full), as a full context does:
        zeros from calloc would not be resident."""
        shape = (1, self.heads, length, self.head_dim)
        return {name: np.full(shape, 0, self.dtype) if fill else np.zeros(shape, self.dtype) for name in self.names}


def kv_layout(sess: ort.InferenceSession, head_dim: int | None = None) -> KVLayout:
    """Read from the graph's declared past inputs (`head_dim` for graphs that leave it symbolic)."""
    inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
    return KVLayout([i.name for i in inputs], int(inputs[0].shape[1]), head_dim or int(inputs[0].shape[3]), dtype)


def feed(ids: np.ndarray, past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
    batch, seq = ids.shape
    return {"input_ids": ids, "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64), **past}


class SharedCache:
    """Runs the graph as onnxruntime-genai does with `past_present_share_buffer`: one KV buffer of `context`
    positions per layer, bound as both the past input and the present output, written in place."""

    def __init__(self, sess: ort.InferenceSession, context: int, head_dim: int | None = None):
        self.sess = sess
        self.buffers = {name: ort.OrtValue.ortvalue_from_numpy(array)
                        for name, array in kv_layout(sess, head_dim).empty(context, fill=True).items()}
        self.binding = sess.io_binding()

    def run(self, ids: np.ndarray, past_len: int) -> np.ndarray:
        """Feed `ids` after `past_len` cached tokens; returns the logits."""
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, past_len + ids.shape[1]), dtype=np.int64))
        binding.bind_output("logits")
        for name, buffer in self.buffers.items():
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), buffer)
        self.sess.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def measure(model: str, provider: str, threads: int, prefill_tokens: int, context: int, runs: int,
            head_dim: int | None = None) -> dict:
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    sess = session(model, provider, threads)
    load_ms = 1e3 * (time.perf_counter() - start)
    cache = SharedCache(sess, context, head_dim)
    vocab = int(sess.get_outputs()[0].shape[2])
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, prefill_tokens), dtype=np.int64)

    prefill_times, logits = [], None
    for _ in range(runs):
        start = time.perf_counter()
        logits = cache.run(ids, 0)
        prefill_times.append(1e3 * (time.perf_counter() - start))
    decode_times = []
    for step in range(DECODE_STEPS):
        token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        start = time.perf_counter()
        logits = cache.run(token, prefill_tokens + step)
        decode_times.append(1e3 * (time.perf_counter() - start))
    cache.run(token, context - 1)  # a step with the KV cache full
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
    parser.add_argument("--head-dim", type=int, default=None, help="for graphs that leave it symbolic")
    args = parser.parse_args(argv)
    result = measure(args.model, args.provider, args.threads, args.prefill_tokens, args.context, args.runs,
                     args.head_dim)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
