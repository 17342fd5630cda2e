"""Latency and peak memory of an ONNX model in onnxruntime, measured in a fresh process; and the on-device benchmark
of an export folder.

Self-contained on purpose (Python 3.8+, numpy and onnxruntime; onnxruntime-genai's version is recorded where it is
installed): `scripts/bench_on_device.py` is this file, to be copied with an export folder to a phone (Termux), a
Raspberry Pi or a laptop:

    python bench_on_device.py EXPORT_FOLDER [--threads N] [--json result.json] [--parity-only] [--graph model.ort]

measures load time, prefill of the profile's prompt length, decode ms/token and peak memory, checks that the
device's kernels reproduce the greedy tokens stored in the export (device_check.json, made with this same code when
the export was validated), records which execution provider ran each operator, and writes one JSON result with the
device's description; `edgeslim calibrate` fits a profile to such results. The pipeline runs
`python -m exporter.measure MODEL --provider P --threads N --prefill-tokens T --context C
--reference-prompt IDS` (one JSON object; the same session then writes the export's device_check.json).

A fresh process is the only honest way to read a session's peak memory: the parent holds PyTorch and the
model. Memory is the growth of the process's peak resident set (VmHWM) above its peak before the session was
created, so it includes the weights as loaded, the runtime's arena, the KV cache (one buffer of C positions per
layer, shared by past and present as onnxruntime-genai runs it), a prefill of T tokens and a decode step with the
cache full.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # run as scripts/bench_on_device.py (a link to this file), Python puts exporter/ first on the path, where the
    # package's select.py and profile.py would stand in for the standard library's
    sys.path.pop(0)

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

DECODE_STEPS = 16
REFERENCE_FILE = "device_check.json"  # in an export: a prompt and the greedy tokens the device must reproduce
PARITY_STEPS = 8
CPU = "CPUExecutionProvider"


def _peak_rss_bytes() -> int:
    """VmHWM: this process's peak resident set. (getrusage's ru_maxrss would carry the parent's peak over
    fork+exec, and the parent holds PyTorch and the model.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: an upper bound


def session(model: str | bytes, provider: str, threads: int, profile_prefix: str | None = None,
            data_folder: str | None = None, arena: bool = True) -> ort.InferenceSession:
    """`model`: a file, or a serialized graph whose external weights are in `data_folder`; `profile_prefix`: write
    onnxruntime's own profile there (which provider ran each node, and how long); `arena`: keep freed activation
    memory for the next run (faster; without it a session's memory goes back as each tensor is freed)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", data_folder)
    options.enable_cpu_mem_arena = arena
    providers = [provider] if provider == CPU else [provider, CPU]
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


def prefill_and_decode(cache: SharedCache, ids: np.ndarray, runs: int,
                       steps: int) -> tuple[list[float], list[float], np.ndarray]:
    """ms of `runs` prefills of `ids`, ms of each of `steps` greedy decode steps after the last, and the last token
    fed."""
    prefill_times, logits = [], None
    for _ in range(runs):
        start = time.perf_counter()
        logits = cache.run(ids, 0)
        prefill_times.append(1e3 * (time.perf_counter() - start))
    decode_times, token = [], None
    for step in range(steps):
        token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        start = time.perf_counter()
        logits = cache.run(token, ids.shape[1] + step)
        decode_times.append(1e3 * (time.perf_counter() - start))
    return prefill_times, decode_times, token


def measure(model: str, provider: str, threads: int, prefill_tokens: int, context: int, runs: int,
            head_dim: int | None = None, reference_prompt: list[int] | None = None) -> dict:
    """`reference_prompt`: afterwards, store the greedy tokens after it beside the model (`write_reference`), from
    this same session: the exporter never holds the whole shipped model itself."""
    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    sess = session(model, provider, threads)
    load_ms = 1e3 * (time.perf_counter() - start)
    cache = SharedCache(sess, context, head_dim)
    vocab = int(sess.get_outputs()[0].shape[2])
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, prefill_tokens), dtype=np.int64)

    prefill_times, decode_times, token = prefill_and_decode(cache, ids, runs, DECODE_STEPS)
    cache.run(token, context - 1)  # a step with the KV cache full
    peak = _peak_rss_bytes() - baseline
    if reference_prompt is not None:
        write_reference(sess, Path(model).parent, reference_prompt, prefill_tokens, context, threads, head_dim)
    return {
        "provider": sess.get_providers()[0],
        "threads": threads,
        "prefill_tokens": prefill_tokens,
        "prefill_ms": statistics.median(prefill_times),
        "decode_ms_per_token": statistics.median(decode_times),
        "peak_memory_bytes": peak,
        "load_ms": load_ms,
    }


def greedy(cache: SharedCache, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """`steps` greedy tokens after `prompt`, through the shared KV buffer, and each step's margin (top-1 logit minus
    top-2): where a margin is a near-tie, other kernels may rightly choose the other token."""
    logits = cache.run(np.array([prompt], dtype=np.int64), 0)
    tokens, margins = [], []
    for step in range(steps):
        top2 = np.sort(logits[0, -1])[-2:]
        tokens.append(int(logits[0, -1].argmax()))
        margins.append(round(float(top2[1] - top2[0]), 4))
        if step + 1 < steps:
            logits = cache.run(np.array([tokens[-1:]], dtype=np.int64), len(prompt) + step)
    return tokens, margins


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def describe_machine() -> dict:
    """What a result was measured on: enough to tell a phone from a Pi from this laptop."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "CPU part") and value.strip():
                cpu = value.strip()
                break
    try:
        import onnxruntime_genai

        genai = onnxruntime_genai.__version__
    except ImportError:
        genai = None
    return {"machine": platform.machine(), "system": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "providers_available": ort.get_available_providers(), "onnxruntime_genai": genai}


def write_reference(sess: ort.InferenceSession, folder: Path, prompt: list[int], prefill_tokens: int, context: int,
                    threads: int, head_dim: int | None = None) -> None:
    """Store the shipped graph's greedy tokens on this machine (a fresh KV buffer), for the device to reproduce."""
    cache = SharedCache(sess, context, head_dim)
    tokens, margins = greedy(cache, list(prompt), PARITY_STEPS)
    reference = {"prompt": [int(t) for t in prompt], "tokens": tokens, "margins": margins,
                 "prefill_tokens": prefill_tokens, "threads": threads, "made_on": describe_machine()}
    (folder / REFERENCE_FILE).write_text(json.dumps(reference, indent=1) + "\n")


def _placement(profile_file: str) -> dict[str, dict[str, int]]:
    """{provider: {operator: nodes}} from onnxruntime's own profile of a session."""
    events = json.loads(Path(profile_file).read_text())
    nodes = {event["name"]: event["args"] for event in events
             if event.get("cat") == "Node" and "provider" in event.get("args", {})}
    placement: dict[str, Counter] = {}
    for args in nodes.values():
        placement.setdefault(args["provider"], Counter())[args["op_name"]] += 1
    return {name: dict(sorted(ops.items())) for name, ops in placement.items()}


def check_export(folder: Path, provider: str, threads: int | None, runs: int, parity_only: bool,
                 graph: str | None = None) -> dict:
    """The on-device benchmark of one export folder (see the module's docstring); `graph`: a file in the folder
    other than the decoder genai_config.json names (the ORT-format model.ort, say)."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    reference = json.loads((folder / REFERENCE_FILE).read_text())
    model = str(folder / (graph or config["decoder"]["filename"]))
    context, head_dim = config["context_length"], config["decoder"]["head_size"]
    threads = threads or reference["threads"]
    result = {"device": describe_machine(), "export": folder.name, "graph": Path(model).name, "provider": provider,
              "threads": threads}
    if not parity_only:  # first, while this process's peak memory is still its baseline
        result["measurement"] = measure(model, provider, threads, reference["prefill_tokens"], context, runs,
                                        head_dim)
    with tempfile.TemporaryDirectory() as folder_for_profile:  # one session: the tokens, and where each op ran
        sess = session(model, provider, threads, profile_prefix=str(Path(folder_for_profile) / "profile"))
        got, margins = greedy(SharedCache(sess, context, head_dim), reference["prompt"], len(reference["tokens"]))
        result["placement"] = _placement(sess.end_profiling())
    same = common_prefix(got, reference["tokens"])
    result["parity"] = {"expected": reference["tokens"], "got": got, "identical": got == reference["tokens"],
                        "same_prefix": same, "expected_made_on": reference["made_on"],
                        # at the first difference: how close the two top tokens were there, and here
                        "margins_at_difference": None if same == len(got) else
                        {"expected": reference["margins"][same], "got": margins[same]}}
    plan = folder / "plan.json"
    if plan.exists():  # what `edgeslim calibrate` fits the profile with
        result["latency_terms"] = json.loads(plan.read_text())["predicted"]["latency_terms"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="an export folder (on-device benchmark) or one .onnx or .ort file")
    parser.add_argument("--graph", default=None, help="with a folder: the graph file in it to run (e.g. model.ort); "
                        "default: the decoder genai_config.json names")
    parser.add_argument("--provider", default=CPU)
    parser.add_argument("--threads", type=int, default=None, help="default: the threads the export was made for")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="with a .onnx file")
    parser.add_argument("--context", type=int, default=None, help="with a .onnx file")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--head-dim", type=int, default=None, help="for graphs that leave it symbolic")
    parser.add_argument("--parity-only", action="store_true", help="no timing (under emulation, say)")
    parser.add_argument("--reference-prompt", default=None, help=f"with a .onnx file: token ids (1,2,3) whose greedy "
                        f"continuation to store in {REFERENCE_FILE} beside it, for a device to reproduce")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    target = Path(args.target)
    if target.is_dir():
        if not (target / REFERENCE_FILE).exists():
            parser.error(f"{target}: no {REFERENCE_FILE}; give an edgeslim export folder")
        result = check_export(target, args.provider, args.threads, args.runs, args.parity_only, args.graph)
    elif None in (args.threads, args.prefill_tokens, args.context):
        parser.error("with a graph file, give --threads, --prefill-tokens and --context")
    else:
        prompt = None if args.reference_prompt is None else [int(t) for t in args.reference_prompt.split(",")]
        result = measure(args.target, args.provider, args.threads, args.prefill_tokens,
                         args.context, args.runs, args.head_dim, prompt)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
