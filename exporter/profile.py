"""Device profiles: a YAML file describing a device and an app's budget on it, validated field by field.

Every problem is reported as one line naming the field and what to do, because profiles are written by hand and
read by unattended release builds. The schema is documented in device_profiles/README.md.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from exporter.contracts import DeviceProfile
from exporter.errors import UsageError

# int8 is deliberately absent: onnxruntime 1.32's 8-bit MatMulNBits has no fast CPU kernel (measured on
# SmolLM2-135M: 440 ms/token decode against 20 ms at int4 and 47 ms at fp32), so it would never be the right choice.
PRECISIONS = ("fp32", "int4")
KV_PRECISIONS = ("fp32", "fp16")
MAX_CONTEXT = 131072
MAX_THREADS = 256

# field -> (type, required). Sections are nested mappings; their fields are named "section.field" in errors.
_TOP_FIELDS: dict[str, tuple[type, bool]] = {
    "name": (str, True),
    "description": (str, False),
    "execution_providers": (list, True),
    "threads": (int, True),
    "precision": (str, True),
    "kv_cache_precision": (str, False),
    "context_length": (int, True),
    "memory_budget_mib": (float, True),
    "latency": (dict, True),
    "hardware": (dict, True),
    "quality": (dict, False),
}
_SECTION_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "latency": {
        "decode_ms_per_token": (float, True),
        "prefill_ms": (float, True),
        "prefill_tokens": (int, True),
    },
    "hardware": {
        "memory_bandwidth_gbps": (float, True),
        "compute_gflops": (float, True),
        "op_overhead_us": (float, False),
    },
    "quality": {
        "max_ppl_ratio": (float, False),
    },
}


def load_profile(path: str | Path) -> DeviceProfile:
    """Read and validate a profile file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"device profile {path} does not exist; pass a YAML file (see `edgeslim devices`)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"device profile {path} is not valid YAML{where}; fix the syntax") from None
    except UnicodeDecodeError:
        raise UsageError(f"device profile {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    return parse_profile(raw, source=str(path))


def parse_profile(raw: Any, source: str = "profile") -> DeviceProfile:
    """Validate an already-parsed mapping; raises UsageError naming the first wrong field."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping of fields at the top level, got {_kind(raw)}")
    top = _check_fields(raw, _TOP_FIELDS, prefix="", source=source)
    sections = {
        name: _check_fields(top.get(name, {}), fields, prefix=f"{name}.", source=source)
        for name, fields in _SECTION_FIELDS.items()
    }
    providers = top["execution_providers"]
    if not providers or not all(isinstance(p, str) and p for p in providers):
        raise UsageError(f"{source}: execution_providers must be a non-empty list of provider names")
    if top["precision"] not in PRECISIONS:
        raise UsageError(f"{source}: precision must be one of {', '.join(PRECISIONS)}, got {top['precision']!r}")
    if top.get("kv_cache_precision", "fp32") not in KV_PRECISIONS:
        raise UsageError(f"{source}: kv_cache_precision must be one of {', '.join(KV_PRECISIONS)}, "
                         f"got {top['kv_cache_precision']!r}")
    profile = DeviceProfile(
        name=top["name"],
        description=top.get("description", ""),
        execution_providers=tuple(providers),
        threads=top["threads"],
        precision=top["precision"],
        kv_cache_precision=top.get("kv_cache_precision", "fp32"),
        context_length=top["context_length"],
        memory_budget_mib=float(top["memory_budget_mib"]),
        decode_ms_per_token=float(sections["latency"]["decode_ms_per_token"]),
        prefill_ms=float(sections["latency"]["prefill_ms"]),
        prefill_tokens=sections["latency"]["prefill_tokens"],
        memory_bandwidth_gbps=float(sections["hardware"]["memory_bandwidth_gbps"]),
        compute_gflops=float(sections["hardware"]["compute_gflops"]),
        **({"op_overhead_us": float(sections["hardware"]["op_overhead_us"])}
           if "op_overhead_us" in sections["hardware"] else {}),
        **({"max_ppl_ratio": float(sections["quality"]["max_ppl_ratio"])}
           if "max_ppl_ratio" in sections["quality"] else {}),
    )
    _check_ranges(profile, source)
    return profile


def _check_fields(
    raw: Any, fields: dict[str, tuple[type, bool]], prefix: str, source: str
) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: {prefix.rstrip('.')} must be a mapping of fields, got {_kind(raw)}")
    for key in raw:
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known fields: {', '.join(fields)}"
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)  # the error stays one line
            raise UsageError(f"{source}: unknown field {prefix}{shown}{hint}")
    for key, (expected, required) in fields.items():
        if key not in raw:
            if required:
                raise UsageError(f"{source}: missing required field {prefix}{key}")
            continue
        if not _is_type(raw[key], expected):
            raise UsageError(
                f"{source}: {prefix}{key} must be {_type_word(expected)}, got {_kind(raw[key])} {raw[key]!r}"
                + (" (give a plain number; the unit is in the field name)" if isinstance(raw[key], str) else "")
            )
    return raw


def _check_ranges(p: DeviceProfile, source: str) -> None:
    positive = {
        "threads": p.threads,
        "context_length": p.context_length,
        "memory_budget_mib": p.memory_budget_mib,
        "latency.decode_ms_per_token": p.decode_ms_per_token,
        "latency.prefill_ms": p.prefill_ms,
        "latency.prefill_tokens": p.prefill_tokens,
        "hardware.memory_bandwidth_gbps": p.memory_bandwidth_gbps,
        "hardware.compute_gflops": p.compute_gflops,
        "hardware.op_overhead_us": p.op_overhead_us,
        "quality.max_ppl_ratio": p.max_ppl_ratio,
    }
    for name, value in positive.items():
        if not value > 0 or value == float("inf"):
            raise UsageError(f"{source}: {name} must be a positive finite number, got {value}")
    if p.threads > MAX_THREADS:
        raise UsageError(f"{source}: threads must be at most {MAX_THREADS}, got {p.threads}")
    if p.context_length > MAX_CONTEXT:
        raise UsageError(f"{source}: context_length must be at most {MAX_CONTEXT}, got {p.context_length}")
    if p.prefill_tokens > p.context_length:
        raise UsageError(
            f"{source}: latency.prefill_tokens ({p.prefill_tokens}) must not exceed context_length "
            f"({p.context_length})"
        )


def _is_type(value: Any, expected: type) -> bool:
    if isinstance(value, bool):  # YAML `yes`/`true` must not pass as the number 1
        return False
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _type_word(expected: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a mapping",
    }[expected]


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "a list",
            dict: "a mapping", type(None): "nothing"}.get(type(value), type(value).__name__)


def shipped_profiles() -> list[Path]:
    """The profiles in this repository's device_profiles/ folder."""
    folder = Path(__file__).resolve().parent.parent / "device_profiles"
    return sorted(folder.glob("*.yaml"))
