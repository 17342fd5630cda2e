"""Generation through onnxruntime: the same tokens as transformers' generate; stop rules; teacher forcing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny

from exporter.export import export_model
from exporter.generate import Decoder, OnnxDecoder, TorchDecoder, generate
from exporter.models import describe, normalize_


class ScriptedDecoder(Decoder):
    """Emits a fixed token sequence, one-hot logits; records what it was fed."""

    label = "scripted"

    def __init__(self, script: list[int], vocab: int = 320):
        self.script, self.vocab, self.fed = script, vocab, []

    def _logits(self) -> np.ndarray:
        logits = np.zeros(self.vocab, dtype=np.float32)
        logits[self.script[len(self.fed)]] = 1.0
        return logits

    def start(self, ids):
        self.fed = []
        return self._logits()

    def step(self, token):
        self.fed.append(token)
        return self._logits()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_onnx_generation_matches_transformers_generate(tmp_path, family, tokenizer):
    model = normalize_(build_tiny(family))
    artifact = export_model(model, tokenizer, describe(model), tmp_path, "fp32", context_length=64)
    prompt = tokenizer("def wrap(text, width):\n", return_tensors="pt").input_ids
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                              min_new_tokens=24, pad_token_id=1)[0, prompt.shape[1]:].tolist()
    onnx = generate(OnnxDecoder.from_file(artifact.model_file), prompt[0].tolist(), 24)
    torch_tokens = generate(TorchDecoder(model), prompt[0].tolist(), 24)
    assert onnx.tokens == expected == torch_tokens.tokens
    assert onnx.stopped_by == "max new tokens" and len(onnx.tokens) == 24


def test_stop_string_cuts_the_text_and_ends_generation(tokenizer):
    script = tokenizer("x = 1\nprint(x)\ny = 2\n").input_ids
    decoder = ScriptedDecoder(script + [5] * 10)
    result = generate(decoder, [3], 50, tokenizer=tokenizer, stop_strings=("\nprint(",))
    assert result.text == "x = 1"
    assert result.stopped_by == "stop string"
    assert len(result.tokens) < len(script)  # stopped as soon as the stop string appeared


def test_end_of_sequence_and_token_limit(tokenizer):
    result = generate(ScriptedDecoder([7, 8, 1, 9]), [3], 10, tokenizer=tokenizer, eos_token_ids=(1,))
    assert result.tokens == [7, 8, 1] and result.stopped_by == "end of sequence"
    assert result.text == tokenizer.decode([7, 8])
    limited = generate(ScriptedDecoder([7, 8, 1, 9]), [3], 2)
    assert limited.tokens == [7, 8] and limited.stopped_by == "max new tokens"


def test_teacher_forcing_feeds_the_true_tokens():
    decoder = ScriptedDecoder([4, 4, 4, 4])
    logits = decoder.logits_for([3], [10, 11, 12])
    assert logits.shape == (3, 320) and decoder.fed == [10, 11]


def test_teacher_forced_logits_agree_between_runtimes(tmp_path, tokenizer):
    model = normalize_(build_tiny("llama"))
    artifact = export_model(model, tokenizer, describe(model), tmp_path, "fp32", context_length=64)
    context, targets = tokenizer("def f(x):").input_ids, tokenizer("\n    return x * 2\n").input_ids
    one_pass = TorchDecoder(model).logits_for(context, targets)
    stepped = OnnxDecoder.from_file(artifact.model_file).logits_for(context, targets)
    assert one_pass.shape == stepped.shape == (len(targets), 320)
    assert np.abs(one_pass - stepped).max() < 1e-4
