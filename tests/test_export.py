"""Export of every supported family: KV-cache graph names, factorized layers, parity with PyTorch in ORT."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny

from exporter.contracts import RankPlan
from exporter.export import export_model, past_names, present_names
from exporter.factorize import factorize_
from exporter.generate import OnnxDecoder, TorchDecoder
from exporter.measure import session
from exporter.models import describe, normalize_
from exporter.plan import layers_at
from exporter.select import get_method
from exporter.validate import greedy_trace


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral", "phi3", "gemma", "gemma3_text"])
def test_factorized_export_matches_pytorch(tmp_path, family, tokenizer):
    model = normalize_(build_tiny(family))
    spec = describe(model)
    plan = RankPlan("t", "fp32", 0.5, 8, layers_at(spec, 0.5, 8), None, None)
    factorize_(model, plan, get_method("svd"), {})
    artifact = export_model(model, tokenizer, spec, tmp_path, "fp32", context_length=64)
    sess = session(artifact.model_file, "CPUExecutionProvider", 1)
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids", "attention_mask", "position_ids", *past_names(spec.num_layers)]
    assert [o.name for o in sess.get_outputs()] == ["logits", *present_names(spec.num_layers)]
    torch.manual_seed(1)
    ids = torch.randint(2, 300, (1, 40))  # longer than gemma3's sliding window of 32
    ref_logits, ref_tokens = greedy_trace(TorchDecoder(model), ids)
    logits, tokens = greedy_trace(OnnxDecoder(sess), ids)
    assert tokens == ref_tokens
    assert abs(logits - ref_logits).max() <= 1e-4 * max(1.0, abs(ref_logits).max())
    genai = json.loads((tmp_path / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_key_value_heads"] == spec.num_kv_heads
    assert (tmp_path / "model.onnx.data").is_file() and (tmp_path / "tokenizer.json").is_file()
