"""Synthetic Llama-shaped checkpoints (random weights, the widths and vocabularies of real models) written a block
at a time into safetensors shards, so a checkpoint larger than this machine's memory can be made on it: what
scripts/bench_scale.py measures the export's cost on, and what the capped-memory test exports.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from exporter.checkpoint import ShardWriter

# name: hidden, intermediate, attention heads, KV heads, vocabulary, tied embeddings, blocks in the real model
SHAPES = {
    "smollm2-135m": (576, 1536, 9, 3, 49152, True, 30),
    "qwen2-0.5b": (896, 4864, 14, 2, 151936, True, 24),
    "llama-3.2-1b": (2048, 8192, 32, 8, 128256, True, 16),
    "llama-3.2-3b": (3072, 8192, 24, 8, 128256, True, 28),
    "llama-2-7b": (4096, 11008, 32, 32, 32000, False, 32),
}


def llama_config(hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tied: bool,
                 layers: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied,
                       num_hidden_layers=layers, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def write_checkpoint(config: LlamaConfig, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random checkpoint of `config` in `folder`: one safetensors shard per block (and per tensor outside them),
    and the index that maps tensors to shards, as sharded Hugging Face checkpoints are; one block is in memory at a
    time."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    writer, block = ShardWriter(folder, shard_bytes=float("inf")), None
    for name, parameter in model.named_parameters():  # tied weights are listed once, under the embedding's name
        if name.split(".")[:3] != block:  # a shard per block, one per tensor outside the blocks
            writer.flush()
            block = name.split(".")[:3]
        writer.add(name, _random(parameter.shape, dtype))
    writer.finish()
    config.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def _random(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Matrices normal(0, 0.02), vectors (norms) ones: a plain init, fast at 7B widths."""
    return torch.randn(shape, dtype=dtype) * 0.02 if len(shape) > 1 else torch.ones(shape, dtype=dtype)


def tokenizer(vocabulary: int = 8192) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in seconds on standard-library sources: smaller than every shape's vocabulary."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocabulary, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    bpe.train_from_iterator([(stdlib / f).read_text() for f in ("textwrap.py", "shlex.py", "argparse.py")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")
