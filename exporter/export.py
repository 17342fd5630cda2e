"""ONNX export with a KV cache, in the names optimum and onnxruntime-genai use.

Inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key|value`; outputs `logits`,
`present.N.key|value`. `logits` holds the last position only ([batch, 1, vocab]), as on-device runtimes such as
llama.cpp do: generation needs nothing else, and all-position logits cost prompt x vocab x 4 bytes plus, at
int4, a dequantized fp32 copy of the lm_head while the prompt is processed (measured on SmolLM2-135M int4,
256-token prompt: about 150 MiB of a 250 MiB peak).

The graph comes from `torch.onnx.export(dynamo=True)` (factorized layers are two plain MatMuls), stripped of the
exporter's debug records, then:
1. transposed views of initializers are stored transposed, so a tied lm_head becomes a plain MatMul weight
   (which the quantizer can compress) instead of a Transpose the runtime would copy at load time;
2. at int4 the weights are block-quantized by onnxruntime's MatMulNBits quantizer (exporter.quantize).
The fp32 graph is kept beside the shipped one as the reference that parity against PyTorch is checked on.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from exporter.contracts import ModelSpec, OnnxArtifact
from exporter.quantize import quantize_graph

MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference-fp32.onnx"


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class KVCacheGraph(nn.Module):
    """The model as a function of flat tensors: (ids, mask, positions, *past) -> (logits, *present)."""

    def __init__(self, model: PreTrainedModel, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # see module docstring: the last position is all generation needs
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_reference(model: PreTrainedModel, spec: ModelSpec, path: Path) -> None:
    """Write the fp32 graph with dynamic batch, sequence and past lengths."""
    batch, seq, past_len = 2, 3, 4  # not 0 or 1: torch.export would specialize such dimensions
    kv_shape = (batch, spec.num_kv_heads, past_len, spec.head_dim)
    args = (
        torch.randint(0, spec.vocab_size, (batch, seq)),
        torch.ones(batch, past_len + seq, dtype=torch.int64),
        torch.arange(past_len, past_len + seq).expand(batch, seq),
        *[torch.zeros(kv_shape) for _ in range(2 * spec.num_layers)],
    )
    b, s, p, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: total},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in range(2 * spec.num_layers)),
    }
    graph = KVCacheGraph(model, spec.num_layers).eval()
    with warnings.catch_warnings(), _quiet_exporter(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            args,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names(spec.num_layers)],
            output_names=["logits", *present_names(spec.num_layers)],
            verbose=False,
        )
    proto = fold_transposed_initializers(strip_debug_metadata(program.model_proto))
    save(proto, path)


def strip_debug_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node debug records (FX node text, Python stack traces with per-process counters):
    they make two exports of the same model differ byte for byte and carry nothing a runtime reads."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    for info in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        del info.metadata_props[:]
    return proto


def fold_transposed_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace Transpose(initializer) by a transposed initializer (a tied lm_head is one)."""
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            array = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded = np.ascontiguousarray(np.transpose(array, perm))
            graph.initializer.append(numpy_helper.from_array(folded, node.output[0]))
        else:
            kept_nodes.append(node)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    return proto


def save(proto: onnx.ModelProto, path: Path) -> None:
    """The graph in `<name>`, its weights in `<name>.data` beside it, always.

    External data is required above protobuf's 2 GB, and it pays below too: onnxruntime maps the file instead of
    parsing a second copy of every weight out of the protobuf (measured on SmolLM2-135M int4: session peak
    105 MiB instead of 191 MiB after loading).
    """
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def artifact_bytes(path: Path) -> int:
    """The model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def write_genai_config(spec: ModelSpec, model: PreTrainedModel, folder: Path, context_length: int) -> None:
    """onnxruntime-genai's config for this graph; KV buffers are not shared between past and present."""
    config = model.config
    eos = config.eos_token_id if config.eos_token_id is not None else 0
    genai = {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_attention_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "type": spec.model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    (folder / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")


def export_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: ModelSpec,
    folder: Path,
    precision: str,
    context_length: int,
) -> OnnxArtifact:
    """Write the shipped graph, the fp32 reference, tokenizer files and genai_config.json into `folder`."""
    reference = folder / (MODEL_FILE if precision == "fp32" else REFERENCE_FILE)
    export_reference(model, spec, reference)
    shipped = folder / MODEL_FILE
    if precision != "fp32":
        save(quantize_graph(reference, precision), shipped)
    tokenizer.save_pretrained(folder)
    write_genai_config(spec, model, folder, context_length)
    opset = next(o.version for o in onnx.load(str(shipped), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    return OnnxArtifact(
        folder=str(folder),
        model_file=str(shipped),
        reference_file=str(reference),
        precision=precision,
        file_bytes=artifact_bytes(shipped),
        opset=opset,
    )


class _quiet_exporter:
    """Silence the exporter's and quantizer's progress logging, which would tear the progress bar."""

    def __enter__(self):
        self._level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        return self

    def __exit__(self, *exc):
        logging.disable(self._level)
        return False
