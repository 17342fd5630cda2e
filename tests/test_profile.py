"""Device profiles: the shipped ones load; every kind of bad input is one clear UsageError."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from exporter.errors import UsageError
from exporter.profile import load_profile, parse_profile, shipped_profiles

VALID = {
    "name": "t",
    "execution_providers": ["CPUExecutionProvider"],
    "threads": 2,
    "precision": "int4",
    "context_length": 256,
    "memory_budget_mib": 100,
    "latency": {"decode_ms_per_token": 50, "prefill_ms": 500, "prefill_tokens": 64},
    "hardware": {"memory_bandwidth_gbps": 10, "compute_gflops": 50},
}


def with_change(path: str, value):
    raw = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    target = raw
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[leaf]
    else:
        target[leaf] = value
    return raw


def test_shipped_profiles_load():
    names = {p.stem for p in shipped_profiles()}
    assert {"phone", "phone-flagship", "wearable", "raspberry-pi-5", "laptop"} <= names
    for path in shipped_profiles():
        profile = load_profile(path)
        assert profile.name == path.stem
        assert profile.memory_budget_bytes > 0


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("memory_budget_mb", 100, "unknown field memory_budget_mb; did you mean memory_budget_mib?"),
        ("latency.decode_ms", 5, "unknown field latency.decode_ms; did you mean latency.decode_ms_per_token?"),
        ("threads", "four", "threads must be an integer"),
        ("threads", 2.5, "threads must be an integer"),
        ("memory_budget_mib", "100 MiB", "the unit is in the field name"),
        ("memory_budget_mib", -5, "memory_budget_mib must be a positive finite number"),
        ("memory_budget_mib", 0, "memory_budget_mib must be a positive finite number"),
        ("latency.prefill_ms", KeyError, "missing required field latency.prefill_ms"),
        ("precision", "int3", "precision must be one of fp32, int4"),
        ("context_length", True, "context_length must be an integer, got a boolean"),
        ("execution_providers", [], "execution_providers must be a non-empty list"),
        ("latency.prefill_tokens", 4096, "must not exceed context_length"),
        ("context_length", 10**9, "context_length must be at most"),
        ("hardware", [1, 2], "hardware must be a mapping"),
    ],
)
def test_bad_fields_name_the_field(path, value, message):
    with pytest.raises(UsageError) as error:
        parse_profile(with_change(path, value), source="p.yaml")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML at line"):
        load_profile(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(mutation=st.sampled_from(["drop", "set", "add"]), key=st.sampled_from(sorted(
    ["name", "threads", "precision", "context_length", "memory_budget_mib", "execution_providers",
     "latency.decode_ms_per_token", "latency.prefill_ms", "latency.prefill_tokens",
     "hardware.memory_bandwidth_gbps", "hardware.compute_gflops", "latency", "hardware"])), value=yaml_values)
@example(mutation="set", key="hardware", value={"\n": None})  # found by hypothesis: a field name with a newline
def test_mutated_profiles_never_raise_anything_else(mutation, key, value):
    if mutation == "drop":
        raw = with_change(key, KeyError)
    elif mutation == "set":
        raw = with_change(key, value)
    else:
        raw = with_change("extra_" + key.replace(".", "_"), value)
    try:
        profile = parse_profile(raw)
    except UsageError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert profile.threads > 0 and profile.memory_budget_mib > 0


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_yaml_text_never_raises_anything_else(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "p.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_profile(path)
    except UsageError as error:
        assert str(error)


def test_round_trip_through_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_profile(path).prefill_tokens == 64
