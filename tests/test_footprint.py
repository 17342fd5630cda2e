"""The export's own memory and time, predicted before loading: a checkpoint too big for this machine is refused."""

from __future__ import annotations

import pytest
import torch
from test_pipeline import write_profile
from transformers import LlamaForCausalLM

from exporter import footprint
from exporter.contracts import MIB
from exporter.errors import UsageError
from exporter.pipeline import RunConfig, run
from exporter.synthetic import SHAPES, llama_config


@pytest.mark.parametrize("arch", ["llama", "gpt2"], indirect=True)
def test_footprint_is_read_from_the_config_alone(tiny_model_dir, tiny_model):
    predicted = footprint.checkpoint_footprint(tiny_model_dir)
    assert predicted.parameters == sum(p.numel() for p in tiny_model.parameters())
    hidden, inner = 128, 320 if tiny_model.config.model_type == "llama" else 512
    # per block: attention's inputs (one width), the MLP's input and its down projection's; the lm_head's; and the
    # widest (the down projection's) decomposed
    assert predicted.gram_bytes == (footprint.GRAM_BYTES * (2 * (2 * hidden**2 + inner**2) + hidden**2)
                                    + footprint.DECOMPOSITION_BYTES * inner**2)
    assert predicted.peak_bytes == pytest.approx(footprint.BASE_BYTES + footprint.FP32_COPIES * 4 *
                                                 predicted.parameters + predicted.gram_bytes)
    assert predicted.seconds > footprint.BASE_SECONDS


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_export_that_would_not_fit_this_machine_is_refused_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    needed = footprint.checkpoint_footprint(tiny_model_dir).peak_bytes
    monkeypatch.setattr(footprint, "available_bytes", lambda: int(needed / 2))
    monkeypatch.setattr("exporter.pipeline.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"needs about .* GB here .* available"):
        run(RunConfig(device=str(write_profile(tmp_path / "p.yaml")), model=str(tiny_model_dir), out=str(out)))
    assert not out.exists()
    monkeypatch.setenv(footprint.SKIP_CHECK, "1")  # the user's override
    assert footprint.choose_streaming(tiny_model_dir, str(tiny_model_dir)) == (False, None)


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_a_model_that_fits_only_a_block_at_a_time_is_streamed(tiny_model_dir, monkeypatch):
    needed = footprint.checkpoint_footprint(tiny_model_dir)
    assert needed.streamed_peak_bytes < needed.peak_bytes
    monkeypatch.setattr(footprint, "available_bytes", lambda: int(needed.peak_bytes - 1))
    streamed, note = footprint.choose_streaming(tiny_model_dir, "m")
    assert streamed and "a block at a time" in note
    assert footprint.choose_streaming(tiny_model_dir, "m", requested=True) == (True, None)
    with pytest.raises(UsageError, match=r"in memory, predicted.*or --layer-streaming"):
        footprint.choose_streaming(tiny_model_dir, "m", requested=False)
    monkeypatch.setattr(footprint, "available_bytes", lambda: int(needed.peak_bytes + 1))
    assert footprint.choose_streaming(tiny_model_dir, "m") == (False, None)  # one pass, every option


def test_a_streamed_export_needs_no_more_memory_for_more_blocks_on_a_device_budget():
    """A block at a time, what grows with depth is only the shipped model measured running, in its own process;
    that is the device memory the check measures, so the device's budget bounds it: on a 1.5 GiB budget a
    Llama-2-7B-shaped export needs the same at 32 blocks as at 64, and less than with no budget."""
    hidden, intermediate, heads, kv_heads, vocab, tied, layers = SHAPES["llama-2-7b"]

    def needed(blocks: int, budget: float = float("inf")) -> float:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(hidden, intermediate, heads, kv_heads, vocab, tied, blocks))
        return footprint.export_footprint(model, budget).streamed_peak_bytes

    budget = 1536 * MIB
    assert needed(layers, budget) == needed(2 * layers, budget) < needed(layers)
    assert needed(layers) == pytest.approx(footprint.MEASURING_BASE_BYTES
                                           + footprint.RUNTIME_BYTES_PER_PARAMETER * 6.74e9, rel=0.01)
    assert needed(2 * layers) > needed(layers)  # no budget: the whole model runs
