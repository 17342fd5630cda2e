"""The export's own cost on this machine: peak resident memory and wall time of `edgeslim export`, predicted from
the model's shape before anything is loaded, so that a run which does not fit in memory is exported a block at a
time (exporter.stream), and one which fits neither way is refused with advice instead of being killed.

In memory, the pipeline holds the model in fp32 several times over: the loaded dense model (the reference what ships
is judged by), its int4-rounded mirror (the PyTorch twin the shipped weights are proven against) and the fp32
reference graph onnxruntime runs for parity; and it holds the calibration statistics, a float32 Gram matrix per
distinct projection input (counted from the shapes), and one float64 copy of the widest while it is decomposed
(whitening, GPTQ: one at a time). Everything else is bounded per matrix (GPTQ rounds 8192 rows at
a time), per window (quality scores 64 positions at a time) or streamed (graph weights go straight to their data
file). So the peak is linear in the model's fp32 bytes plus the statistics. The coefficients are fitted to
`scripts/bench_scale.py` (README, "Scale"): real exports of Llama-shaped checkpoints from 135M to 7B widths, whose
plans ship the dense model; a factorized plan also holds the copy being compressed, one more fp32 copy, which this
leaves out. A streamed export holds one block, the tables outside the blocks and one block's statistics instead.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from exporter.architectures import arch_for
from exporter.contracts import MIB, DeviceProfile
from exporter.errors import UsageError
from exporter.relearn import EPOCHS

# Fitted to scripts/bench_scale.py on this 2-core machine (README, "Scale").
FP32_COPIES = 3.48  # peak bytes per fp32 byte of the model, beyond the statistics
BASE_BYTES = 1.27e9  # the interpreter, torch, onnxruntime and the data before any model is loaded
GRAM_BYTES = 4  # one float32 Gram entry per distinct projection input, d_in^2 of them, all held at once
DECOMPOSITION_BYTES = 8  # the float64 copy of one Gram matrix being decomposed, d_in^2 of the widest
CALIBRATION_TOKENS = 16 * 256  # the default calibration windows: the Gram matrices' accumulation work
SECONDS_PER_TFLOP = 66.9  # of GPTQ (d_in^3 + d_in^2 d_out per matrix) and Gram accumulation (2 tokens d_in^2)
BASE_SECONDS = 40.8
SKIP_CHECK = "EDGESLIM_SKIP_MEMORY_CHECK"


# A streamed export (exporter.stream) holds one block, the tables outside the blocks (embedding, lm_head), one
# block's statistics and the calibration hidden states at a time (GPTQ's float64 inverse of the widest input is
# not a term of its own: the fit over five widths absorbs it). Fitted to scripts/bench_scale.py --streaming
# (scripts/results/bench_scale_streamed_session12.md). Validation runs its graphs a few blocks at a time
# (exporter.segments), within that; but measuring the shipped graph's own latency and memory runs it whole, in a
# process of its own, beside the exporter's: what the model needs to run. That process's growth is the device
# memory the check measures, so the device's budget bounds it (a plan is made to fit the budget; a measurement
# over it is planned again tighter, or fails the run): however deep the model, the host needs the block term or
# the budget plus a base, whichever is more.
STREAM_BASE_BYTES = 0.64e9
STREAM_COPIES = 0.90  # peak bytes per fp32 byte of the largest block and the tables outside the blocks
MEASURING_BASE_BYTES = 0.77e9  # the exporter while the shipped graph is measured, and the measuring interpreter
RUNTIME_BYTES_PER_PARAMETER = 0.94  # the int4 model in onnxruntime (0.64 bytes a parameter in its file), prepacked
STREAM_SECONDS_PER_TFLOP = 43.8  # the same work as in memory; float32 statistics sums
STREAM_BASE_SECONDS = 81.4

# Layer-wise relearning (basel-layerwise) adds, per block, training over every basis of every projection (all of
# them trained, whatever the rank): forward and backward, 6 flops a basis entry a token, EPOCHS times over the
# calibration tokens; and it holds the largest block's bases (U and V^T L^-1 in fp32) beside the block. Fitted to
# one run: SmolLM2-135M on phone at 180 MiB, every layer factorized, 92 s of training for 11.7 TFLOP.
RELEARN_SECONDS_PER_TFLOP = 7.9


@dataclass(frozen=True)
class Footprint:
    parameters: int
    gram_bytes: float  # the calibration statistics, and the decomposition of the widest
    work_flops: float  # what the time grows with
    peak_bytes: float  # in memory: the whole model loaded
    seconds: float
    streamed_peak_bytes: float  # a block at a time (exporter.stream)
    streamed_seconds: float
    streamed_parameters: int  # what a streamed export holds: the largest block and everything outside the blocks
    relearning_bytes: float  # what layer-wise relearning adds to the streamed peak
    relearning_seconds: float  # and to its time


def export_footprint(model: nn.Module, memory_budget_bytes: float = float("inf")) -> Footprint:
    """What `edgeslim export` of `model` (its weights may be on the meta device) will need here, at int4, for a
    device whose memory budget is `memory_budget_bytes` (the shipped model, running, holds at most that). A plan
    that factorizes needs no more: a block at a time, its float64 decompositions, one projection at a time, peak
    below GPTQ's inverse of the widest input, which every int4 export makes (a one-block Llama-2-7B-width
    checkpoint on a profile that forces factorizing: 2.36 GB, as the 2-block dense export of that width; session
    17)."""
    parameters = _count(model)  # tied weights counted once
    shapes = dict(_projections(model))
    gram_entries = _gram_entries(shapes)
    work = sum(d_in**3 + d_in**2 * d_out for d_in, d_out in shapes.values())
    work += 2 * CALIBRATION_TOKENS * gram_entries
    gram_bytes = GRAM_BYTES * gram_entries + DECOMPOSITION_BYTES * max(d_in for d_in, _ in shapes.values()) ** 2
    blocks = model.get_submodule(arch_for(model.config.model_type).blocks)
    block = max(blocks, key=_count)
    in_blocks = sum(_count(b) for b in blocks)
    outside = parameters - in_blocks  # embedding, lm_head, final norm
    held = _count(block) + outside
    streamed_work = work
    if model.get_input_embeddings().weight is model.get_output_embeddings().weight:
        streamed_work += 2 * CALIBRATION_TOKENS * in_blocks  # the dense pass a tied table's GPTQ needs first
    bases = {id(b): _basis_entries(b) for b in blocks}
    streamed = max(STREAM_BASE_BYTES + STREAM_COPIES * 4 * held
                   + GRAM_BYTES * _gram_entries(dict(_projections(block)))
                   + 4 * CALIBRATION_TOKENS * model.config.hidden_size,  # a block at a time
                   MEASURING_BASE_BYTES + min(RUNTIME_BYTES_PER_PARAMETER * parameters,
                                              memory_budget_bytes))  # the shipped model, running
    return Footprint(parameters=parameters, gram_bytes=gram_bytes, work_flops=work,
                     peak_bytes=BASE_BYTES + FP32_COPIES * 4 * parameters + gram_bytes,
                     seconds=BASE_SECONDS + SECONDS_PER_TFLOP * work / 1e12, streamed_peak_bytes=streamed,
                     streamed_seconds=STREAM_BASE_SECONDS + STREAM_SECONDS_PER_TFLOP * streamed_work / 1e12,
                     streamed_parameters=held, relearning_bytes=4 * bases[id(block)],
                     relearning_seconds=RELEARN_SECONDS_PER_TFLOP * EPOCHS * 6 * CALIBRATION_TOKENS
                     * sum(bases.values()) / 1e12)


def _basis_entries(block: nn.Module) -> int:
    """Entries of the bases relearning trains over in `block`: U (d_out x m) and V^T (m x d_in), m = min(d_in,
    d_out), for every projection."""
    return sum(min(d_in, d_out) * (d_in + d_out) for _, (d_in, d_out) in _projections(block))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _gram_entries(shapes: dict[str, tuple[int, int]]) -> int:
    """Entries of the Gram matrices of these projections: those of one module reading the same width read the
    same tensor (q/k/v, gate/up) and share one (attention's output projection, same width, other tensor, is
    missed: one hidden^2 per block, a few percent)."""
    inputs = {(name.rpartition(".")[0], d_in): d_in for name, (d_in, _) in shapes.items()}
    return sum(d * d for d in inputs.values())


def _projections(model: nn.Module):
    """(name, (d_in, d_out)) of every matrix the pipeline rounds: Linear layers, and GPT-2's Conv1D (W is (in, out))."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            yield name, tuple(module.weight.shape)


def checkpoint_footprint(folder: Path, trust_remote_code: bool = False,
                         profile: DeviceProfile | None = None) -> Footprint:
    """The footprint of a Hugging Face model folder, from its config alone (nothing is loaded), exported for
    `profile` (its memory budget bounds the shipped model, measured running)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return export_footprint(model, float("inf") if profile is None else profile.memory_budget_mib * MIB)


def choose_streaming(folder: Path, source: str, trust_remote_code: bool = False, requested: bool | None = None,
                     relearning: bool = False, profile: DeviceProfile | None = None) -> tuple[bool, str | None]:
    """(whether to export a block at a time, a line saying why when it was not asked for), refusing, before
    anything is loaded, an export that would not fit this machine's available memory either way. `requested`:
    None lets the memory decide (in memory when it fits: one pass, and vocabulary pruning needs the whole model).
    `relearning`: the method relearns a block at a time (basel-layerwise), which streams and holds the block's
    bases too. `profile`: the device's, whose memory budget bounds the shipped model measured running."""
    available = available_bytes()
    if os.environ.get(SKIP_CHECK) == "1" or available is None:
        return bool(requested), None
    needed = checkpoint_footprint(folder, trust_remote_code, profile)
    if relearning:
        needed = replace(needed, streamed_peak_bytes=needed.streamed_peak_bytes + needed.relearning_bytes)
    if requested is None and needed.peak_bytes <= available:
        return False, None
    streamed = requested is not False and (requested or needed.streamed_peak_bytes <= available)
    peak = needed.streamed_peak_bytes if streamed else needed.peak_bytes
    if peak > available:
        raise UsageError(f"--model {source}: exporting it needs about {peak / 1e9:.1f} GB here "
                         f"({'a block at a time' if streamed else 'in memory'}, predicted) and this machine has "
                         f"{available / 1e9:.1f} GB available; use a machine with more memory or a smaller model"
                         f"{'' if streamed else ', or --layer-streaming'} (set {SKIP_CHECK}=1 to try anyway)")
    if requested is None:
        return True, (f"exporting in memory would need about {needed.peak_bytes / 1e9:.1f} GB and "
                      f"{available / 1e9:.1f} GB are available: exporting a block at a time (about "
                      f"{needed.streamed_peak_bytes / 1e9:.1f} GB; every vocabulary row is kept, since pricing fewer "
                      "needs the whole model)")
    return streamed, None


def available_bytes() -> int | None:
    """Memory the kernel says a new allocation can have now (MemAvailable), or None where it does not say."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


class RssSampler:
    """This process's resident memory, sampled every `interval` seconds on a thread, so that report.json can say
    which stage of the run reached the peak (the kernel keeps only the overall peak, VmHWM)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.samples = interval, []  # (time.monotonic(), bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _sample(self) -> None:
        statm = Path("/proc/self/statm")
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic(), int(statm.read_text().split()[1]) * self._page))

    def __enter__(self) -> RssSampler:
        if Path("/proc/self/statm").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def peak_between(self, start: float, end: float) -> int | None:
        """The highest sample from `start` to one interval past `end` (a stage shorter than the interval still
        gets the sample taken just after it)."""
        inside = [rss for when, rss in self.samples if start <= when <= end + self.interval]
        return max(inside) if inside else None
