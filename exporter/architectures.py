"""Architecture knowledge as data: where the decoder blocks are and which projections to compress.

Adding a family is adding one entry here (never a match on the model's *name*). `conv1d` marks GPT-2 style
`Conv1D` projections (weight stored d_in x d_out), which loading turns into nn.Linear (models.normalize_).
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import UsageError


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path to the ModuleList of decoder blocks
    projections: tuple[str, ...]  # module paths inside one block
    lm_head: str = "lm_head"
    conv1d: bool = False


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    projections=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,  # attention biases on q/k/v: kept on the second factor
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchSpec(
        blocks="model.layers",
        projections=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        projections=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        conv1d=True,
    ),
}


def arch_for(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UsageError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        ) from None
