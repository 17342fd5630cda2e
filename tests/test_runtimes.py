"""Exports run unchanged in the runtimes apps use: onnxruntime-genai (`og.Model(folder)`, shared KV buffer, greedy
search) and optimum's ORTModelForCausalLM give the same tokens as edgeslim's own generator on the same graph."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from test_pipeline import write_profile

from exporter.generate import OnnxDecoder, generate
from exporter.pipeline import RunConfig, run
from exporter.runtime_tokenizer import check_runtime_tokenizer

PROMPT = [5, 17, 42, 99, 7, 31, 64, 12]
STEPS = 16


@pytest.fixture
def export(tmp_path, tiny_model_dir):
    profile = write_profile(tmp_path / "p.yaml", kv_cache_precision="fp16")
    out = tmp_path / "out"
    result = run(RunConfig(device=str(profile), model=str(tiny_model_dir), out=str(out), parity_prompts=1,
                           max_ppl_ratio=100))
    assert result.passed, result.failures
    return out


def edgeslim_tokens(out, eos: int) -> list[int]:
    return generate(OnnxDecoder.from_file(out / "model.onnx"), PROMPT, STEPS, eos_token_ids=(eos,)).tokens


@pytest.mark.parametrize("arch", ["llama", "qwen2"], indirect=True)
def test_onnxruntime_genai_generates_what_edgeslim_generates(export):
    og = pytest.importorskip("onnxruntime_genai")
    out = export
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    ours = edgeslim_tokens(out, config["model"]["eos_token_id"])
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + STEPS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    assert theirs == ours


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_onnxruntime_genai_tokenizes_as_transformers(export, tokenizer):
    pytest.importorskip("onnxruntime_genai")
    out = export
    check = json.loads((out / "report.json").read_text())["tokenizer"]
    assert check["runtime"].startswith("onnxruntime-genai") and check["texts"] > 0 and check["differing"] == 0
    # the class name transformers' GGUF loader gives SmolLM2's byte-level BPE: genai then guesses Llama 3's split
    # unless the export spells GPT-2's out
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    texts = [source[i:i + 400] for i in range(0, 8000, 400)]
    as_gguf_names_it(out)
    assert check_runtime_tokenizer(out, tokenizer, texts).differing == 0
    tokenizer.save_pretrained(out)  # the split left implied
    as_gguf_names_it(out)
    implied = check_runtime_tokenizer(out, tokenizer, texts)
    assert implied.differing > 0 and not implied.passed


def as_gguf_names_it(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_optimum_generates_what_edgeslim_generates(export):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    out = export
    model = ORTModelForCausalLM.from_pretrained(out)  # reads config.json and model.onnx, growing KV cache
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False, eos_token_id=eos)
    assert tokens[0, len(PROMPT):].tolist() == edgeslim_tokens(out, eos)
