"""The export's own cost on this machine: peak resident memory and wall time of `edgeslim export`, predicted from the
model's shape before anything is loaded, so a run that cannot fit is refused with advice instead of being killed
by the kernel minutes in.

The pipeline holds the model in fp32 several times over: the loaded dense model (the reference what ships is judged
by), the copy being compressed, its int4-rounded mirror, the weights as serialized into the graph and the graphs
onnxruntime loads for parity and quality. So the peak is linear in the model's fp32 bytes; the coefficients are
fitted to `scripts/bench_scale.py` (README, "Scale"), which measures real exports of Llama-shaped checkpoints from
135M to 7B widths.
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

from exporter.errors import UsageError

# Fitted to scripts/bench_scale.py on this 2-core machine (see the README's "Scale" table).
FP32_COPIES = 5.0  # peak bytes per fp32 byte of the model
BASE_BYTES = 1.2e9  # the interpreter, torch, onnxruntime and the data before any model is loaded
SECONDS_PER_GFLOP = 0.05  # GPTQ (d_in^3 + d_in^2 d_out per matrix) and the held-out quality pass
BASE_SECONDS = 40.0
SKIP_CHECK = "EDGESLIM_SKIP_MEMORY_CHECK"


@dataclass(frozen=True)
class Footprint:
    parameters: int
    gptq_flops: float
    peak_bytes: float
    seconds: float


def export_footprint(model: nn.Module) -> Footprint:
    """What `edgeslim export` of `model` (its weights may be on the meta device) will need here, at int4."""
    parameters = sum(p.numel() for p in model.parameters())  # tied weights counted once
    gptq_flops = sum(m.in_features**3 + m.in_features**2 * m.out_features
                     for m in model.modules() if isinstance(m, nn.Linear))
    return Footprint(parameters=parameters, gptq_flops=gptq_flops, peak_bytes=BASE_BYTES + FP32_COPIES * 4 * parameters,
                     seconds=BASE_SECONDS + SECONDS_PER_GFLOP * gptq_flops / 1e9)


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
