"""Architecture knowledge as data: where the decoder blocks are, which projections to compress, and what the graph
builder (exporter.graph) needs to rebuild a block from its modules.

Adding a family is adding one entry here (never a match on the model's *name*). `conv1d` marks GPT-2 style
`Conv1D` projections (weight stored d_in x d_out), which loading turns into nn.Linear (models.normalize_).
Module names are relative to one block unless they say otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import UsageError


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path to the ModuleList of decoder blocks
    qkv: tuple[str, ...]  # the attention's input projections: q, k, v, or one fused q|k|v
    attention_out: str
    mlp_in: tuple[str, ...]  # gate and up, one fused gate|up, or the single input of an ungated MLP
    mlp_out: str
    attention_norm: str  # before attention
    mlp_norm: str  # before the MLP
    final_norm: str  # dotted path from the model
    attention_out_norm: str | None = None  # Gemma 2/3: normalises the attention's output before the residual add
    mlp_out_norm: str | None = None  # Gemma 2/3: normalises the MLP's output before the residual add
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    scaled_embedding: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    qk_norm: bool = False  # Gemma 3: RMSNorm over each head of q and k before the rotary embedding
    positions: str | None = None  # dotted path of learned position embeddings (GPT-2); else rotary
    local_rotary: str | None = None  # Gemma 3: the sliding-window layers' own rotary embedding
    conv1d: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.qkv, self.attention_out, *self.mlp_in, self.mlp_out)

    @property
    def gated(self) -> bool:
        return len(self.mlp_in) == 2 or self.fused_gate_up

    @property
    def fused_gate_up(self) -> bool:
        return self.mlp_in == ("mlp.gate_up_proj",)


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attention_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attention_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    final_norm="model.norm",
)
_GEMMA = ArchSpec(**{**_LLAMA_LIKE.__dict__, "norm_offset": 1.0, "scaled_embedding": True})
_GEMMA2 = ArchSpec(**{**_GEMMA.__dict__, "attention_out_norm": "post_attention_layernorm",
                      "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"})

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,  # attention biases on q/k/v: kept on the second factor
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": ArchSpec(**{**_GEMMA2.__dict__, "qk_norm": True, "local_rotary": "model.rotary_emb_local"}),
    "phi3": ArchSpec(**{**_LLAMA_LIKE.__dict__, "qkv": ("self_attn.qkv_proj",), "mlp_in": ("mlp.gate_up_proj",)}),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        qkv=("attn.c_attn",),
        attention_out="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attention_norm="ln_1",
        mlp_norm="ln_2",
        final_norm="transformer.ln_f",
        norm="layer",
        positions="transformer.wpe",
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
