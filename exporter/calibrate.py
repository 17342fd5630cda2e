"""`edgeslim calibrate`: a device profile's cost-model figures fitted to what `scripts/bench_on_device.py` measured
on the device, so plans stop resting on numbers typed in from datasheets.

Each result carries the export's latency terms (bytes moved, FLOPs and graph nodes of its prefill and decode, from
plan.json) and the latencies measured on the device. The cost model says ms = max(bytes / bandwidth, FLOPs /
compute) + nodes x per-node overhead; prefill of a prompt is compute-bound and a decode step bandwidth-bound, so
with the per-node overhead held (see `fit`), each result gives one effective compute figure (from prefill) and one
effective bandwidth (from decode). The median over results is written to a new profile; the old one is untouched.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from exporter.contracts import DeviceProfile, LatencyTerms
from exporter.errors import UsageError
from exporter.plan import latency_ms
from exporter.profile import load_profile


@dataclass(frozen=True)
class Observation:
    """One on-device result: what the export asks of the machine, and how long it took there."""

    source: str
    terms: LatencyTerms
    threads: int
    prefill_ms: float
    decode_ms: float


def read_results(paths: list[Path]) -> list[Observation]:
    observations = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
            terms, measured = LatencyTerms(**result["latency_terms"]), result["measurement"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--results {path}: not a bench_on_device.py result with timings ({exc}); run the "
                             "script on an export folder without --parity-only") from exc
        observations.append(Observation(str(path), terms, int(result["threads"]), float(measured["prefill_ms"]),
                                        float(measured["decode_ms_per_token"])))
    return observations


def errors(profile: DeviceProfile, observations: list[Observation]) -> list[tuple[float, float]]:
    """(prefill, decode) prediction error of each observation: predicted / measured - 1."""
    out = []
    for seen in observations:
        prefill, decode = latency_ms(seen.terms, profile.memory_bandwidth_gbps, profile.compute_gflops,
                                     profile.op_overhead_us)
        out.append((prefill / seen.prefill_ms - 1, decode / seen.decode_ms - 1))
    return out


def fit(profile: DeviceProfile, observations: list[Observation]) -> DeviceProfile:
    """The profile with effective bandwidth and compute fitted to the observations. The per-node overhead stays the
    profile's unless a measured decode step is shorter than its nodes would take at it (a fast machine, a tiny
    model); then it is lowered until dispatch is half the fastest step, the rest left to the roofline."""
    overhead_us = min([profile.op_overhead_us,
                       *(0.5e3 * min(seen.decode_ms, seen.prefill_ms) / seen.terms.nodes for seen in observations)])
    bandwidths, computes = [], []
    for seen in observations:
        dispatch_ms = 1e-3 * overhead_us * seen.terms.nodes
        computes.append(seen.terms.prefill_flops / (seen.prefill_ms - dispatch_ms) / 1e6)
        bandwidths.append(seen.terms.decode_bytes / (seen.decode_ms - dispatch_ms) / 1e6)
    return replace(profile, memory_bandwidth_gbps=round(statistics.median(bandwidths), 3),
                   compute_gflops=round(statistics.median(computes), 3), op_overhead_us=round(overhead_us, 3))


def write_profile(source: Path, fitted: DeviceProfile, results: list[Path], out: Path) -> None:
    """The source profile's YAML with the fitted figures (and where they came from) in place of the typed ones."""
    data = yaml.safe_load(source.read_text())
    data["hardware"]["memory_bandwidth_gbps"] = fitted.memory_bandwidth_gbps
    data["hardware"]["compute_gflops"] = fitted.compute_gflops
    data["hardware"]["op_overhead_us"] = fitted.op_overhead_us
    header = (f"# {source.name} with hardware figures fitted by `edgeslim calibrate` to measurements on the device:\n"
              + "".join(f"#   {path}\n" for path in results))
    out.write_text(header + yaml.safe_dump(data, sort_keys=False))


def calibrate(device: Path, results: list[Path], out: Path) -> tuple[list[tuple[float, float]],
                                                                        list[tuple[float, float]], DeviceProfile]:
    """Fit, write, and return (errors before, errors after, the fitted profile)."""
    if out.resolve() == device.resolve():
        raise UsageError(f"--out {out}: is the profile being calibrated; choose a new file (the old one is kept)")
    profile = load_profile(device)
    observations = read_results(results)
    fitted = fit(profile, observations)
    write_profile(device, fitted, results, out)
    load_profile(out)  # what was written reads back as a valid profile
    return errors(profile, observations), errors(fitted, observations), fitted
