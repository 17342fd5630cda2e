"""Proving the export in onnxruntime: parity with the PyTorch compressed model, and measured cost.

Parity is checked on the target task's prompts, for every graph in the export, against its PyTorch counterpart:
the fp32 reference graph against the compressed PyTorch model, and the shipped int4 weights (the shipped graph
with fp32 compute) against the same model holding exactly those int4 weights (exporter.quantize). Both must match:
max |logit difference| within `RELATIVE_TOLERANCE` of the largest logit, and greedy tokens identical for
`GREEDY_STEPS` decode steps through the KV cache (logits compared after the prompt and after every step). The
shipped graph itself computes with int8 activations: how closely it follows is reported, and its quality is
measured and gated on held-out text (exporter.quality). How much int4 changes the model is reported too (top-1
agreement of the int4 and fp32 PyTorch models).
Providers: every one the profile lists that this onnxruntime offers is checked; the rest are listed as "not
available here". A session that silently fell back to CPU counts as not available.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from exporter.contracts import DeviceProfile, Measurement, OnnxArtifact, ParityResult
from exporter.evaluate import top1_agreement
from exporter.generate import Decoder, OnnxDecoder, TorchDecoder, generate
from exporter.measure import common_prefix, session
from exporter.segments import SegmentedGraph

RELATIVE_TOLERANCE = 1e-4
GREEDY_STEPS = 32
CPU = "CPUExecutionProvider"


def providers_to_check(requested: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(providers to validate on, providers not available here); CPU is always validated."""
    available = set(ort.get_available_providers())
    use = [p for p in dict.fromkeys(requested) if p in available]
    if CPU not in use:
        use.append(CPU)
    missing = [p for p in dict.fromkeys(requested) if p not in available]
    return use, missing


def greedy_trace(decoder: Decoder, ids: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """Next-token logits after the prompt and after each greedy token, and the tokens, for `GREEDY_STEPS`."""
    generation = generate(decoder, ids[0].tolist(), GREEDY_STEPS, keep_logits=True)
    return np.stack(generation.logits), generation.tokens


def check_parity(
    graph_file: str,
    label: str,
    prompts: list[torch.Tensor],
    provider: str,
    threads: int,
    references: list[tuple[np.ndarray, list[int]]],
    gated: bool = True,
) -> ParityResult | None:
    """Compare one graph with its PyTorch counterpart; None when the provider silently fell back to CPU."""
    sess = session(graph_file, provider, threads)
    if sess.get_providers()[0] != provider:
        return None
    max_diff, tolerance, matched, identical = 0.0, 0.0, 0, True
    for ids, (ref_logits, ref_tokens) in zip(prompts, references, strict=True):
        logits, tokens = greedy_trace(OnnxDecoder(sess), ids)
        same = 1 + common_prefix(tokens, ref_tokens)  # logits after a divergence answer different contexts
        max_diff = max(max_diff, float(np.abs(logits[:same] - ref_logits[:same]).max()))
        tolerance = max(tolerance, RELATIVE_TOLERANCE * float(np.abs(ref_logits).max()))
        matched += same - 1
        identical &= tokens == ref_tokens
    return ParityResult(
        provider=provider,
        graph=label,
        prompts=len(prompts),
        max_abs_logit_diff=max_diff,
        tolerance=tolerance,
        greedy_steps=GREEDY_STEPS,
        greedy_identical=identical,
        greedy_match_fraction=matched / (GREEDY_STEPS * len(prompts)),
        passed=max_diff <= tolerance and identical,
        gated=gated,
    )


def validate_parity(
    model: PreTrainedModel,
    mirror: PreTrainedModel,
    artifact: OnnxArtifact,
    prompts: list[torch.Tensor],
    requested: tuple[str, ...],
    threads: int,
) -> tuple[list[ParityResult], list[str], float | None]:
    """Parity of the export's graphs on every provider the profile asks for that is really here: the fp32 graph
    against `model`, and at int4 the shipped weights computed exactly against `mirror` (`model` holding the same
    int4 weights), both gated; and how closely the shipped graph (int8 activations) follows that exact twin,
    reported, not gated: that is accuracy, and the held-out quality gate judges it.

    Returns (results, providers not available here, top-1 agreement of the int4 model with its own fp32 self on
    the prompts' positions; None at fp32)."""
    providers, missing = providers_to_check(requested)
    graphs = [(artifact.reference_file, "reference fp32", model, True)]
    if artifact.precision != "fp32":
        graphs.append((artifact.exact_file, f"{artifact.precision} weights, exact compute", mirror, True))
        graphs.append((artifact.model_file, f"shipped {artifact.precision}", mirror, False))
    references = {id(m): [greedy_trace(TorchDecoder(m), ids) for ids in prompts]
                  for m in {id(m): m for m in (model, mirror)}.values()}  # at fp32 the mirror is the model
    results = _on_providers(providers, missing, [
        (lambda provider, file=file, label=label, reference=reference, gated=gated: check_parity(
            file, label, prompts, provider, threads, references[id(reference)], gated))
        for file, label, reference, gated in graphs])
    agreement = None if artifact.precision == "fp32" else top1_agreement(model, mirror, prompts)
    return results, missing, agreement


def validate_positions(
    artifact: OnnxArtifact,
    prompts: list[torch.Tensor],
    compressed_logits: list[np.ndarray],
    mirror_logits: list[np.ndarray],
    requested: tuple[str, ...],
    threads: int,
) -> tuple[list[ParityResult], list[str], float | None]:
    """`validate_parity` for a streamed export (exporter.stream), whose PyTorch twins exist only as the logits of
    every position of each prompt, made in the one pass over the checkpoint: the graphs' all-positions twins give
    the same positions. Gated: the shipped weights computed exactly (at fp32 the shipped graph) against the twin
    holding them; reported: the shipped graph against that twin."""
    providers, missing = providers_to_check(requested)
    twin = compressed_logits if artifact.precision == "fp32" else mirror_logits
    shipped = f"shipped {artifact.precision} (every prompt position)"
    graphs = [(artifact.all_positions_file, shipped, twin, True)]
    if artifact.exact_file != artifact.all_positions_file:  # the shipped graph is inexact (int8 or fp16 compute)
        graphs = [(artifact.exact_file, f"{artifact.precision} weights, exact compute (every prompt position)", twin,
                   True), (artifact.all_positions_file, shipped, twin, False)]
    results = _on_providers(providers, missing, [
        (lambda provider, file=file, label=label, reference=reference, gated=gated: check_positions(
            file, label, prompts, provider, threads, reference, gated))
        for file, label, reference, gated in graphs])
    agreement = None if artifact.precision == "fp32" else float(np.mean(np.concatenate(
        [c.argmax(-1) == m.argmax(-1) for c, m in zip(compressed_logits, mirror_logits, strict=True)])))
    return results, missing, agreement


def _on_providers(providers: list[str], missing: list[str],
                  checks: list[Callable[[str], ParityResult | None]]) -> list[ParityResult]:
    """Every check on every provider; a provider onnxruntime fell back to CPU from is not really here (`missing`)."""
    results = []
    for provider in providers:
        for check in checks:
            result = check(provider)
            if result is None:
                missing.append(provider)
                break
            results.append(result)
    return results


def check_positions(graph_file: str, label: str, prompts: list[torch.Tensor], provider: str, threads: int,
                    references: list[np.ndarray], gated: bool = True) -> ParityResult | None:
    """Every position's logits of each prompt from an all-positions graph against `references`; None when the
    provider silently fell back to CPU. The graph runs a few blocks at a time (exporter.segments)."""
    graph = SegmentedGraph(graph_file, provider, threads)
    pieces: list[list[np.ndarray]] = [[] for _ in prompts]
    for index, _, logits in graph.logits([ids[0].tolist() for ids in prompts]):
        pieces[index].append(logits)
    if graph.fell_back:
        return None
    max_diff, tolerance, same, positions = 0.0, 0.0, 0, 0
    for piece, reference in zip(pieces, references, strict=True):
        logits = np.concatenate(piece)
        max_diff = max(max_diff, float(np.abs(logits - reference).max()))
        tolerance = max(tolerance, RELATIVE_TOLERANCE * float(np.abs(reference).max()))
        same += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        positions += len(reference)
    return ParityResult(provider=provider, graph=label, prompts=len(prompts), max_abs_logit_diff=max_diff,
                        tolerance=tolerance, greedy_steps=0, greedy_identical=same == positions,
                        greedy_match_fraction=same / positions, passed=max_diff <= tolerance and same == positions,
                        gated=gated)


def measure_session(model_file: str, provider: str, threads: int, prefill_tokens: int, context: int,
                    reference_prompt: list[int] | None = None) -> Measurement:
    """Latency and peak memory of one graph, measured in a fresh process; with `reference_prompt`, that process
    also stores the greedy tokens a device must reproduce beside the graph (exporter.measure.write_reference)."""
    prompt = [] if reference_prompt is None else ["--reference-prompt", ",".join(map(str, reference_prompt))]
    return Measurement(**run_measure([model_file, "--provider", provider, "--threads", str(threads),
                                      "--prefill-tokens", str(prefill_tokens), "--context", str(context), *prompt]))


def run_measure(args: list[str]) -> dict:
    """`python -m exporter.measure ARGS` in a fresh process (the only honest peak memory), its JSON result."""
    done = subprocess.run([sys.executable, "-m", "exporter.measure", *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring {args[0]} failed: {tail}")
    return json.loads(done.stdout)


def host_figures(threads: int) -> dict:
    """This machine's effective bandwidth and matmul throughput, so the latency model can be checked here."""
    size = 64 * 1024 * 1024  # 256 MiB of float32: well beyond any cache
    src, dst = np.ones(size, dtype=np.float32), np.empty(size, dtype=np.float32)
    copies = []
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        copies.append(time.perf_counter() - start)
    bandwidth = 2 * src.nbytes / min(copies) / 1e9  # read + write
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    compute = 10 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
    torch.set_num_threads(old)
    return {
        # not measurable in isolation (a chain of tiny ops costs ~0.6 µs a node here, a real decoder graph ~5):
        # the cost model's default, fitted once on this kind of machine (README, "Cost model")
        "op_overhead_us": DeviceProfile.op_overhead_us,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads_used": threads,
        "memory_bandwidth_gbps": round(bandwidth, 2),
        "compute_gflops": round(compute, 1),
        "onnxruntime": ort.__version__,
    }
