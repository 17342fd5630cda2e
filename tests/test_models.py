"""Loading models from folders, and every way a --model can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from torch import nn
from transformers import AutoModelForCausalLM

from exporter.checkpoint import INDEX_FILE, Checkpoint
from exporter.errors import UsageError
from exporter.gguf_folder import write_folder
from exporter.models import default_gguf, describe, load_model, normalize_


def test_loads_folder_and_describes(tiny_model_dir, arch):
    loaded = load_model(str(tiny_model_dir))
    spec = describe(loaded.model)
    assert spec.model_type == arch
    assert spec.num_layers == 2
    per_block = {"llama": 7, "qwen2": 7, "gpt2": 4}[arch]
    assert len(spec.layers) == 2 * per_block
    assert all(isinstance(loaded.model.get_submodule(layer.name), nn.Linear) for layer in spec.layers)
    if arch == "qwen2":
        assert any(layer.bias for layer in spec.layers) and not spec.tied_embeddings
    total = sum(p.numel() for p in {p.data_ptr(): p for p in loaded.model.parameters()}.values())
    head = 0 if spec.tied_embeddings else spec.lm_head_params
    assert sum(layer.params for layer in spec.layers) + spec.embedding_params + head + spec.other_params == total


def test_gpt2_conv1d_becomes_equivalent_linear():
    model = build_tiny("gpt2")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        after = normalize_(model)(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert isinstance(model.transformer.h[0].attn.c_attn, nn.Linear)


def test_missing_path(tmp_path):
    with pytest.raises(UsageError, match="path does not exist"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        load_model(str(tmp_path))


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, arch):
    (tiny_model_dir / "model.safetensors").unlink()
    torch.save(build_tiny(arch).state_dict(), tiny_model_dir / "pytorch_model.bin")
    with pytest.raises(UsageError, match="--allow-pickle"):
        load_model(str(tiny_model_dir))
    assert load_model(str(tiny_model_dir), allow_pickle=True).model is not None


def test_unsupported_architecture(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["model_type"] = "bert"
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="not supported.*supported model types: .*llama"):
        load_model(str(tiny_model_dir))


def test_truncated_safetensors(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UsageError, match="cannot load the weights"):
        load_model(str(tiny_model_dir))


def test_gguf_is_converted_a_tensor_at_a_time_into_what_transformers_loads(tmp_path):
    """The default model's GGUF, converted with shards of 64 MB: written as it is read (several shards), and every
    tensor equal to transformers' own GGUF loader's (which dequantizes the whole model into memory first)."""
    gguf = default_gguf()
    write_folder(gguf, tmp_path, shard_bytes=64e6)
    shards = set(json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"].values())
    assert len(shards) >= 4 and all((tmp_path / shard).stat().st_size < 64e6 + 120e6 for shard in shards)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    checkpoint = Checkpoint(tmp_path, str(gguf))
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    weights = reference.state_dict()
    assert set(checkpoint.entries) == set(weights) - {"lm_head.weight"}  # tied to the embedding: stored once
    for name in checkpoint.entries:
        assert torch.equal(checkpoint.read_into(name, torch.empty_like(weights[name])), weights[name]), name


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UsageError, match="cannot read the GGUF file"):
        load_model(str(bad))


def test_tokenizer_that_does_not_match(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["vocab_size"] = 100  # the tokenizer has 320 tokens
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError):
        load_model(str(tiny_model_dir))


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="hub is unreachable") as error:
        load_model("edgeslim-test/does-not-exist")
    assert "\n" not in str(error.value)
