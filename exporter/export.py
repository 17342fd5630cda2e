"""Writing the export folder: the shipped graph, the graphs validation needs beside it, tokenizer and runtime config.

The shipped `model.onnx` is built by exporter.graph at the profile's precision. At int4 its MatMulNBits compute
with the activations the plan chose (exporter.graph.COMPUTE_MODES): int8, onnxruntime's fast CPU path on x86 and
Arm (measured on SmolLM2-135M: 1.4-2x faster decode than fp32 activations, the same held-out perplexity, but 1.25x
the weights file in resident memory against 0.86x), or fp32 for the lm_head or everything where memory is what the
budget lacks. Validation needs three more graphs, written beside it and removed before the folder is published:
- `reference-fp32.onnx`: the same structure with the fp32 weights, checked against the PyTorch model;
- `exact-int4.onnx`: the shipped weights in the same graph computed in fp32 throughout (accuracy level 0, an fp32
  KV cache): checked bit-close against the PyTorch model holding the same int4 weights, so the weights are proven;
- `all-positions.onnx`: the shipped graph returning every position's logits, reading the shipped weights file:
  what held-out perplexity is measured with (the shipped graph returns the last position only).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from exporter.contracts import ModelSpec, OnnxArtifact
from exporter.datafile import DataFile
from exporter.graph import GraphOptions, all_positions, build_decoder
from exporter.quantize import Int4Matrix
from exporter.runtime_tokenizer import write_tokenizer

MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference-fp32.onnx"
EXACT_FILE = "exact-int4.onnx"
ALL_POSITIONS_FILE = "all-positions.onnx"


def save(proto: onnx.ModelProto, path: Path) -> None:
    """A graph built in memory: the graph in `<name>`, its weights in `<name>.data` beside it (exporter.datafile).
    Mutates `proto`: its tensors then point into the data file, so variants of the graph can be saved beside it that
    read the same file (`save_variant`)."""
    with DataFile(path.with_name(path.name + ".data")) as data:
        for tensor in proto.graph.initializer:
            data.externalize(tensor)
    onnx.save_model(proto, str(path))


def write_decoder(path: Path, model: PreTrainedModel, spec: ModelSpec, options: GraphOptions,
                  quantized: dict[str, Int4Matrix] | None = None) -> onnx.ModelProto:
    """build_decoder with every weight written into `<name>.data` as it is made, then the graph saved: the graph is
    never held in memory with its weights."""
    with DataFile(path.with_name(path.name + ".data")) as data:
        proto = build_decoder(model, spec, options, quantized, data)
    onnx.save_model(proto, str(path))
    return proto


def save_variant(proto: onnx.ModelProto, path: Path) -> None:
    """A graph whose large tensors already point into a saved data file: only the graph itself is written."""
    onnx.save_model(proto, str(path))


def artifact_bytes(path: Path) -> int:
    """The model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def write_genai_config(spec: ModelSpec, model: PreTrainedModel, folder: Path, context_length: int) -> None:
    """onnxruntime-genai's config for this graph: past and present KV share one buffer of `context_length`."""
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
            "past_present_share_buffer": True,
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
    quantized: dict[str, Int4Matrix] | None = None,
    activations: str = "int8",
    kv_cache: str = "fp32",
) -> OnnxArtifact:
    """Write the shipped graph, the graphs validation needs, tokenizer files, the model's config.json and
    genai_config.json into `folder`.
    `quantized` (exporter.quantize) holds the int4 weights when the precision is int4; `activations` is what its
    matmuls compute with (the plan's choice); `kv_cache` the cache's precision (the profile's)."""
    shipped_path = folder / MODEL_FILE
    shipped = write_decoder(shipped_path, model, spec, GraphOptions(context_length, activations, kv_cache), quantized)
    reference_path = exact_path = shipped_path
    if precision != "fp32":
        reference_path = folder / REFERENCE_FILE
        write_decoder(reference_path, model, spec, GraphOptions(context_length))
    if shipped_path != reference_path or kv_cache != "fp32":  # the shipped weights, computed in fp32 throughout
        exact_path = folder / EXACT_FILE
        write_decoder(exact_path, model, spec, GraphOptions(context_length), quantized)
    save_variant(all_positions(shipped), folder / ALL_POSITIONS_FILE)
    write_runtime_files(folder, tokenizer, model, spec, context_length)
    return artifact_for(shipped, shipped_path, reference_path, exact_path, folder / ALL_POSITIONS_FILE, precision)


def write_runtime_files(folder: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, spec: ModelSpec,
                        context_length: int) -> None:
    """Tokenizer files (that runtimes split as transformers does: exporter.runtime_tokenizer), the model's
    config.json (optimum's ORTModelForCausalLM reads it) and genai_config.json."""
    write_tokenizer(tokenizer, folder)
    model.config.to_json_file(folder / "config.json")
    write_genai_config(spec, model, folder, context_length)


def artifact_for(shipped: onnx.ModelProto, shipped_path: Path, reference_path: Path, exact_path: Path,
                 all_positions_path: Path, precision: str) -> OnnxArtifact:
    return OnnxArtifact(
        folder=str(shipped_path.parent),
        model_file=str(shipped_path),
        reference_file=str(reference_path),
        exact_file=str(exact_path),
        all_positions_file=str(all_positions_path),
        precision=precision,
        file_bytes=artifact_bytes(shipped_path),
        nodes=len(shipped.graph.node),
        opset=next(o.version for o in shipped.opset_import if o.domain in ("", "ai.onnx")),
    )
