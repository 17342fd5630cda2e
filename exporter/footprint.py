"""The export's own cost on this machine: peak resident memory and wall time of `edgeslim export`, predicted from the
model's shape before anything is loaded, so a run that cannot fit is refused with advice instead of being killed
by the kernel minutes in.

The pipeline holds the model in fp32 several times over: the loaded dense model (the reference what ships is judged
by), its int4-rounded mirror (the PyTorch twin the shipped weights are proven against) and the fp32 reference graph
onnxruntime runs for parity; and it holds the calibration statistics, a float64 Gram matrix per distinct projection
input (counted from the shapes). Everything else is bounded per matrix (GPTQ rounds 8192 rows at a time), per window
(quality scores 64 positions at a time) or streamed (graph weights go straight to their data file). So the peak is
linear in the model's fp32 bytes plus the statistics. The coefficients are fitted to `scripts/bench_scale.py`
(README, "Scale"): real exports of Llama-shaped checkpoints from 135M to 7B widths, whose plans ship the dense
model; a factorized plan also holds the copy being compressed, one more fp32 copy, which this leaves out.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from exporter.errors import UsageError

# Fitted to scripts/bench_scale.py on this 2-core machine (README, "Scale").
FP32_COPIES = 3.48  # peak bytes per fp32 byte of the model, beyond the statistics
BASE_BYTES = 1.27e9  # the interpreter, torch, onnxruntime and the data before any model is loaded
GRAM_BYTES = 8  # one float64 Gram entry per distinct projection input, d_in^2 of them, all held at once
CALIBRATION_TOKENS = 16 * 256  # the default calibration windows: the Gram matrices' accumulation work
SECONDS_PER_TFLOP = 66.9  # of GPTQ (d_in^3 + d_in^2 d_out per matrix) and Gram accumulation (2 tokens d_in^2)
BASE_SECONDS = 40.8
SKIP_CHECK = "EDGESLIM_SKIP_MEMORY_CHECK"


@dataclass(frozen=True)
class Footprint:
    parameters: int
    gram_bytes: float  # the calibration statistics
    work_flops: float  # what the time grows with
    peak_bytes: float
    seconds: float


def export_footprint(model: nn.Module) -> Footprint:
    """What `edgeslim export` of `model` (its weights may be on the meta device) will need here, at int4."""
    parameters = sum(p.numel() for p in model.parameters())  # tied weights counted once
    shapes = dict(_projections(model))
    # projections of one module reading the same width read the same tensor (q/k/v, gate/up): one Gram matrix
    # (attention's output projection, same width, other tensor, is missed: one hidden^2 per block, a few percent)
    inputs = {(name.rpartition(".")[0], d_in): d_in for name, (d_in, _) in shapes.items()}
    gram_entries = sum(d * d for d in inputs.values())
    work = sum(d_in**3 + d_in**2 * d_out for d_in, d_out in shapes.values())
    work += 2 * CALIBRATION_TOKENS * gram_entries
    gram_bytes = GRAM_BYTES * gram_entries
    return Footprint(parameters=parameters, gram_bytes=gram_bytes, work_flops=work,
                     peak_bytes=BASE_BYTES + FP32_COPIES * 4 * parameters + gram_bytes,
                     seconds=BASE_SECONDS + SECONDS_PER_TFLOP * work / 1e12)


def _projections(model: nn.Module):
    """(name, (d_in, d_out)) of every matrix the pipeline rounds: Linear layers, and GPT-2's Conv1D (W is (in, out))."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            yield name, tuple(module.weight.shape)


def checkpoint_footprint(folder: Path, trust_remote_code: bool = False) -> Footprint:
    """The footprint of a Hugging Face model folder, from its config alone (nothing is loaded)."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return export_footprint(model)


def check_fits(folder: Path, source: str, trust_remote_code: bool = False) -> None:
    """Refuse, before loading anything, an export that would not fit this machine's available memory."""
    available = available_bytes()
    if available is None or os.environ.get(SKIP_CHECK) == "1":
        return
    needed = checkpoint_footprint(folder, trust_remote_code)
    if needed.peak_bytes > available:
        raise UsageError(f"--model {source}: exporting it needs about {needed.peak_bytes / 1e9:.1f} GB here "
                         f"(predicted) and this machine has {available / 1e9:.1f} GB available; use a machine with "
                         f"more memory or a smaller model (set {SKIP_CHECK}=1 to try anyway)")


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
