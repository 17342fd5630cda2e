"""Shared fixtures: tiny random models built from a config (no download), with a small real tokenizer."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 320
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "llama":
        return LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "qwen2":  # attention biases on q/k/v, untied head
        return Qwen2Config(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "gpt2":  # Conv1D projections, learned positions
        return GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=256, **common)
    small = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, **common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **small)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(pad_token_id=1, **{k: v for k, v in small.items() if k != "pad_token_id"})
    if arch == "gemma":  # scaled, tied embeddings
        return GemmaConfig(head_dim=16, **small)
    if arch == "gemma3_text":  # sliding-window and global layers
        return Gemma3TextConfig(head_dim=16, sliding_window=32, **small)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in a second on standard-library source: real merges, no download."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    tok.train_from_iterator([text], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def build_tiny(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch):
    return build_tiny(arch)


@pytest.fixture
def tiny_model_dir(tmp_path, arch, tokenizer) -> Path:
    folder = tmp_path / f"tiny-{arch}"
    build_tiny(arch).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_tiny(tokenizer, texts: list[str] | None = None, steps: int = 150, samples: int = 8):
    """A tiny Llama trained for a few seconds on `texts` (default: two standard-library modules), and those texts as
    calibration batches: unlike a random model it has structure to lose, so compression shows in its loss."""
    from exporter.calibration import calibration_batches
    from exporter.models import normalize_

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = texts or [(stdlib / name).read_text() for name in ("textwrap.py", "shlex.py")]
    calibration = calibration_batches(tokenizer, texts, samples=samples, seq_len=64, seed=0)
    model = normalize_(build_tiny("llama")).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = calibration.batches[step % len(calibration.batches)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), calibration


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama that knows the `code` task's held-out text (HumanEval): trained on it, so that what compression
    costs shows in the held-out perplexity the quality gate reads (a test fixture, not an evaluation)."""
    from exporter.tasks import data_dir, get_task

    texts = [prompt + answer for prompt, answer in get_task("code").heldout(data_dir())[:10]]
    folder = tmp_path_factory.mktemp("trained") / "tiny-trained-llama"
    train_tiny(tokenizer, texts, steps=1500, samples=64)[0].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
