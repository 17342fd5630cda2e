"""A GGUF file as a Hugging Face model folder (safetensors shards, config, tokenizer), dequantized a tensor at a
time, so converting a 7B GGUF needs one tensor and one shard in memory, not the model.

transformers reads GGUF metadata (config, tokenizer) and knows how llama.cpp renames and reshapes each tensor (its
name map and per-architecture tensor processors, e.g. the reversed Q/K permutation of Llama); gguf dequantizes one
tensor from the memory-mapped file. What transformers' own loader does not do is stop after one tensor: it
dequantizes all of them into memory before building the model. Here each tensor goes into a shard as soon as it is
dequantized, in float32 as transformers' loader gives it (`tests/test_models.py` checks both agree).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    load_gguf_checkpoint,
)

from exporter.checkpoint import ShardWriter


def write_folder(gguf: Path, folder: Path, shard_bytes: float = 1e9) -> None:
    """The model in `gguf` as a Hugging Face folder in `folder` (which exists and is empty), in safetensors shards
    of about `shard_bytes`."""
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(skeleton)
    config.architectures = [type(skeleton).__name__]  # tools reading the folder pick the model by it (genai's builder)
    metadata = load_gguf_checkpoint(str(gguf), return_tensors=False)  # config as llama.cpp wrote it
    reader = GGUFReader(gguf)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=metadata["config"])
    writer = ShardWriter(folder, shard_bytes)
    aside: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}  # where some processors put what they split off
    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=aside)
        for name, value in aside["tensors"].items():
            writer.add(name, value.float())
        aside["tensors"].clear()
        if result.name in names:
            writer.add(names[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32)))
    writer.finish()
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
