"""The decoder graph, built directly from the model's weights with onnxruntime's fused operators.

One decoder block is ~11 nodes, as onnxruntime-genai's model builder makes it (a generic torch.onnx trace of the
same block is ~75): SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (the residual add fused into
the norm), one matmul for the projections that read the same input (q/k/v, gate/up: their matrices stacked), and
GroupQueryAttention with the rotary embedding inside. Past and present KV may share one buffer
(GroupQueryAttention writes the new tokens in place when the runtime binds both to the same memory, as
onnxruntime-genai does with `past_present_share_buffer`).

A factorized projection y = B (A x) is two matmuls; the first factors of projections that read the same input are
stacked with their group's other matrices, so a factorized block has at most one extra matmul per factorized
projection. At int4 every matmul is a MatMulNBits; the embedding is a GatherBlockQuantized that reads the lm_head's
int4 table when the two are tied (one table in the file and in memory). The lm_head runs on the last position only
(generation needs nothing else, and all-position logits cost prompt x vocab floats); `all_positions` gives the same
graph with every position's logits, for teacher-forced scoring. A pruned vocabulary (exporter.vocabulary) adds a
Gather from token ids to kept rows before the embedding and one from kept logits back to every token id after the
lm_head, so inputs and outputs keep the full vocabulary.

Inputs: input_ids, attention_mask, past_key_values.N.key|value; outputs: logits, present.N.key|value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporter.architectures import ArchSpec, arch_for
from exporter.contracts import ModelSpec
from exporter.datafile import DataFile
from exporter.errors import UsageError
from exporter.factorize import LowRankLinear
from exporter.quantize import QUANT_BLOCK, Int4Matrix
from exporter.vocabulary import PrunedEmbedding, PrunedHead

OPSET = 21
IR_VERSION = 10  # what onnxruntime 1.32 and the mobile runtimes read
MS = "com.microsoft"
CONTEXT_KEY = "context_length"  # model metadata: the longest sequence the graph serves
LAST_HIDDEN = "last_hidden_state"  # the final norm's output, last position only
ALL_HIDDEN = "hidden_state"
BLOCK_START = "/norm1"  # the name's end of each block's first node
FINAL_NORM = "final_norm"  # the head's first node


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


# What int4 matmuls compute with, as MatMulNBits accuracy levels (blocks, lm_head): 4 quantizes activations to
# int8 per block (onnxruntime's fast CPU path, inexact), 0 computes in fp32 (slower, less memory once prepacked).
COMPUTE_MODES = {"int8": (4, 4), "int8 (lm_head fp32)": (4, 0), "fp32": (0, 0)}


@dataclass(frozen=True)
class GraphOptions:
    context_length: int  # rows of the rotary cache: the longest sequence the graph serves
    activations: str = "fp32"  # a COMPUTE_MODES key
    kv_cache: str = "fp32"  # or "fp16": half the cache's memory; attention then runs in fp16

    @property
    def kv_type(self) -> int:
        return TensorProto.FLOAT16 if self.kv_cache == "fp16" else TensorProto.FLOAT


class _Builder:
    """Accumulates nodes and initializers; every name is unique and says where it comes from."""

    def __init__(self, data: DataFile | None = None):
        self.data = data  # where weights go as they are made; None: inside the graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def add(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
            **attributes) -> list[str]:
        names = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain or None, **attributes))
        return names

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.tensor(name, array) if self.data else
                                 numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, values: list[int] | int) -> str:
        key = (tuple(values) if isinstance(values, list) else values,)
        if key not in self._constants:
            name = f"const/{key[0]}".replace(" ", "")
            self._constants[key] = self.weight(name, np.array(values, dtype=np.int64))
        return self._constants[key]


class _Weights:
    """The model's weights as the graph holds them: fp32 from the modules, or the int4 matrices of `quantized`."""

    def __init__(self, model: nn.Module, builder: _Builder, quantized: dict[str, Int4Matrix] | None,
                 accuracy_level: int = 0):
        self.model, self.b, self.quantized, self.accuracy_level = model, builder, quantized, accuracy_level

    def matmul(self, x: str, paths: list[str], name: str, packed: bool = False,
               level: int | None = None) -> list[str]:
        """One matmul over the stacked matrices of `paths` (Linears reading `x`), split back per path; a factorized
        path contributes its first factor here and gets its second factor as a matmul of its own. `packed`: when
        no path is factorized, the stacked output is returned unsplit (GroupQueryAttention takes q|k|v packed)."""
        modules = [self.model.get_submodule(p) for p in paths]
        stage = [(f"{p}.first", m.first) if isinstance(m, LowRankLinear) else (p, m) for p, m in zip(paths, modules,
                                                                                                     strict=True)]
        dense_biases = [None if isinstance(m, LowRankLinear) else m.bias for m in modules]
        bias = None
        if any(b is not None for b in dense_biases):
            bias = torch.cat([b.detach() if b is not None else torch.zeros(lin.out_features)
                              for b, (_, lin) in zip(dense_biases, stage, strict=True)])
        y = self._linear(x, stage, bias, name, level)
        if packed and not any(isinstance(m, LowRankLinear) for m in modules):
            return [y]
        sizes = [lin.out_features for _, lin in stage]
        parts = [y] if len(stage) == 1 else self.b.add("Split", [y, self.b.constant(sizes)], f"{name}/split",
                                                        len(stage), axis=-1)
        outputs = []
        for part, path, module in zip(parts, paths, modules, strict=True):
            if isinstance(module, LowRankLinear):
                second = module.second
                bias2 = None if second.bias is None else second.bias.detach()
                part = self._linear(part, [(f"{path}.second", second)], bias2, f"{name}/{path.rsplit('.', 1)[-1]}2",
                                    level)
            outputs.append(part)
        return outputs

    def _linear(self, x: str, members: list[tuple[str, nn.Linear]], bias: torch.Tensor | None, name: str,
                level: int | None = None) -> str:
        d_in = members[0][1].weight.shape[1]
        n = sum(lin.weight.shape[0] for _, lin in members)
        key = "+".join(path for path, _ in members)
        bias_name = None if bias is None else self.b.weight(f"{key}.bias", bias.float().numpy())
        if self.quantized is None:
            weight = torch.cat([lin.weight.detach() for _, lin in members]).float().T.numpy()  # (K, N)
            (y,) = self.b.add("MatMul", [x, self.b.weight(f"{key}.weight", weight)], name)
            return y if bias_name is None else self.b.add("Add", [y, bias_name], f"{name}/bias")[0]
        matrices = [self.quantized[path] for path, _ in members]
        inputs = [x, *self._int4_inputs(key, matrices)]
        if bias_name is not None:
            inputs += ["", bias_name]  # g_idx (unused), bias
        (y,) = self.b.add("MatMulNBits", inputs, name, domain=MS, K=d_in, N=n, bits=4, block_size=QUANT_BLOCK,
                          accuracy_level=self.accuracy_level if level is None else level)
        return y

    def _int4_inputs(self, key: str, matrices: list[Int4Matrix]) -> list[str]:
        """Names of (packed weights, scales, zero points) of the stacked matrices, added once per key."""
        packed = np.concatenate([m.packed_weights() for m in matrices])
        scales = np.concatenate([m.scale.numpy() for m in matrices])
        zeros = np.concatenate([m.packed_zero_points() for m in matrices])
        return [self.b.weight(f"{key}.qweight", packed), self.b.weight(f"{key}.scales", scales),
                self.b.weight(f"{key}.zero_points", zeros)]


EMBEDDED = "embedding/hidden"  # the embedding's output, what the first block reads


def build_decoder(model: nn.Module, spec: ModelSpec, options: GraphOptions,
                  quantized: dict[str, Int4Matrix] | None = None, data: DataFile | None = None) -> onnx.ModelProto:
    """The decoder as an ONNX model: fp32 weights from `model`, or int4 ones from `quantized` (exporter.quantize);
    with `data`, each weight is written there as it is made instead of being held in the graph."""
    graph = DecoderGraph(model, spec, options, data)
    for index in range(spec.num_layers):
        graph.add_block(index, quantized)
    return graph.finish(quantized)


class DecoderGraph:
    """The decoder graph made a block at a time: `add_block(i)` reads only block i's weights, so a streamed export
    (exporter.stream) can add each block as it is compressed and free it before reading the next. The embedding
    comes last (`finish`), when the lm_head it may share a table with is rounded, and is placed before the blocks."""

    def __init__(self, model: nn.Module, spec: ModelSpec, options: GraphOptions, data: DataFile | None = None):
        self.model, self.spec, self.options = model, spec, options
        self.arch = arch_for(spec.model_type)
        self.b = b = _Builder(data)
        block_level, self.head_level = COMPUTE_MODES[options.activations]
        self.weights = _Weights(model, b, None, block_level)
        batch, sequence, total = "batch_size", "sequence_length", "total_sequence_length"
        kv_shape = [batch, spec.num_kv_heads, "past_sequence_length", spec.head_dim]
        self.inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, sequence]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total])]
        self.inputs += [helper.make_tensor_value_info(n, options.kv_type, kv_shape)
                        for n in past_names(spec.num_layers)]

        # attention_mask -> seqlens_k (tokens seen - 1, per sequence) and total_sequence_length (GroupQueryAttention)
        seen = b.add("ReduceSum", ["attention_mask", b.constant([1])], "mask/sum", keepdims=0)[0]
        last_index = b.add("Sub", [seen, b.constant(1)], "mask/sub")[0]
        seqlens = b.add("Cast", [last_index], "mask/seqlens_k", to=TensorProto.INT32)[0]
        shape = b.add("Shape", ["attention_mask"], "mask/shape")[0]
        width = b.add("Gather", [shape, b.constant(1)], "mask/width", axis=0)[0]
        total_length = b.add("Cast", [width], "mask/total_sequence_length", to=TensorProto.INT32)[0]
        self.attention = _Attention(b, self.weights, self.arch, spec, options, model, seqlens, total_length)
        self.embedding_at = len(b.nodes)
        self.residual, self.delta = EMBEDDED, None

    def add_block(self, index: int, quantized: dict[str, Int4Matrix] | None = None) -> None:
        """Block `index`'s nodes; its weights from the model, or from `quantized` (which need hold only its own)."""
        b, arch, weights = self.b, self.arch, self.weights
        weights.quantized = quantized
        block = self.model.get_submodule(arch.blocks)[index]
        prefix = f"{arch.blocks}.{index}"
        x, residual = _norm(b, arch, self.residual, self.delta, block.get_submodule(arch.attention_norm),
                            f"{prefix}{BLOCK_START}")
        attended = self.attention(block, prefix, index, x)
        (delta,) = weights.matmul(attended, [f"{prefix}.{arch.attention_out}"], f"{prefix}/attention_out")
        if arch.attention_out_norm:
            delta, _ = _norm(b, arch, delta, None, block.get_submodule(arch.attention_out_norm), f"{prefix}/norm1b")
        x, self.residual = _norm(b, arch, residual, delta, block.get_submodule(arch.mlp_norm), f"{prefix}/norm2")
        self.delta = _mlp(b, weights, arch, block, prefix, x)
        if arch.mlp_out_norm:
            self.delta, _ = _norm(b, arch, self.delta, None, block.get_submodule(arch.mlp_out_norm),
                                  f"{prefix}/norm2b")
        weights.quantized = None  # not kept till the next block: a streamed export frees each block's int4 matrices

    def finish(self, quantized: dict[str, Int4Matrix] | None = None) -> onnx.ModelProto:
        """The embedding (before the blocks), final norm and lm_head; `quantized` holds the lm_head's (and an
        untied embedding's) int4 tables."""
        b, arch, model, spec, options = self.b, self.arch, self.model, self.spec, self.options
        self.weights.quantized = quantized
        blocks_end = len(b.nodes)
        _embedding(b, model, arch, quantized)
        b.nodes[-1].output[0] = EMBEDDED
        b.nodes[self.embedding_at:] = b.nodes[blocks_end:] + b.nodes[self.embedding_at:blocks_end]
        final, _ = _norm(b, arch, self.residual, self.delta, model.get_submodule(arch.final_norm), FINAL_NORM,
                         ALL_HIDDEN)
        b.add("Slice", [final, b.constant([-1]), b.constant([2**62]), b.constant([1])], "last_position", [LAST_HIDDEN])
        _lm_head(b, self.weights, model, quantized, LAST_HIDDEN, self.head_level)
        self.weights.quantized = None

        # one logits row a sequence: the static 1 tells onnxruntime-genai the graph returns the last position only
        batch, total = "batch_size", "total_sequence_length"
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, spec.vocab_size])]
        outputs += [helper.make_tensor_value_info(n, options.kv_type, [batch, spec.num_kv_heads, total, spec.head_dim])
                    for n in present_names(spec.num_layers)]
        graph = helper.make_graph(b.nodes, "edgeslim-decoder", self.inputs, outputs, b.initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="edgeslim")
        proto.ir_version = IR_VERSION
        helper.set_model_props(proto, {CONTEXT_KEY: str(options.context_length)})  # what generation may fill
        return proto


class _Attention:
    """q, k, v from their projections -> GroupQueryAttention over the KV cache (rotary inside) -> its output."""

    def __init__(self, b: _Builder, weights: _Weights, arch: ArchSpec, spec: ModelSpec, options: GraphOptions,
                 model: nn.Module, seqlens: str, total_length: str):
        self.b, self.weights, self.arch, self.spec, self.options = b, weights, arch, spec, options
        self.config, self.seqlens, self.total_length = model.config, seqlens, total_length
        self.caches = {}
        if arch.positions is None:
            self.caches["global"] = _rotary_caches(b, model.model.rotary_emb, options.context_length,
                                                   options.kv_cache, "")
            if arch.local_rotary:
                self.caches["local"] = _rotary_caches(b, model.get_submodule(arch.local_rotary),
                                                      options.context_length, options.kv_cache, "local_")

    def __call__(self, block: nn.Module, prefix: str, index: int, x: str) -> str:
        b, arch, spec = self.b, self.arch, self.spec
        module = block.get_submodule(arch.qkv[0].rsplit(".", 1)[0])
        qkv = self.weights.matmul(x, [f"{prefix}.{p}" for p in arch.qkv], f"{prefix}/qkv", packed=not arch.qk_norm)
        if arch.qk_norm:  # Gemma 3: RMSNorm over each head of q and of k
            q, k, v = qkv
            qkv = [_head_norm(b, arch, q, module.q_norm, f"{prefix}/q_norm"),
                   _head_norm(b, arch, k, module.k_norm, f"{prefix}/k_norm"), v]
        if self.options.kv_cache == "fp16":
            qkv = [b.add("Cast", [t], f"{t}/fp16", to=TensorProto.FLOAT16)[0] for t in qkv]
        window = getattr(module, "sliding_window", getattr(self.config, "sliding_window", None))
        cos, sin = self.caches.get("local" if window and "local" in self.caches else "global", ("", ""))
        softcap = getattr(self.config, "attn_logit_softcapping", None) or 0.0
        attended = b.add(
            "GroupQueryAttention",
            [*qkv, *([""] * (3 - len(qkv))), f"past_key_values.{index}.key", f"past_key_values.{index}.value",
             self.seqlens, self.total_length, cos, sin], f"{prefix}/attention",
            [f"{prefix}/attention/out", f"present.{index}.key", f"present.{index}.value"],
            domain=MS, num_heads=spec.num_attention_heads, kv_num_heads=spec.num_kv_heads,
            scale=_attention_scale(module, spec, index), do_rotary=int(arch.positions is None), rotary_interleaved=0,
            local_window_size=int(window) if window else -1, softcap=float(softcap),
        )[0]
        if self.options.kv_cache == "fp16":
            attended = b.add("Cast", [attended], f"{prefix}/attention/fp32", to=TensorProto.FLOAT)[0]
        return attended


def _attention_scale(module: nn.Module, spec: ModelSpec, index: int) -> float:
    if hasattr(module, "scaling"):
        return float(module.scaling)
    scale = spec.head_dim**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0  # GPT-2
    return scale / (index + 1) if getattr(module, "scale_attn_by_inverse_layer_idx", False) else scale


def _mlp(b: _Builder, weights: _Weights, arch: ArchSpec, block: nn.Module, prefix: str, x: str) -> str:
    mlp = block.get_submodule(arch.mlp_out.rsplit(".", 1)[0])
    activation = next(getattr(mlp, name) for name in ("act_fn", "activation_fn", "act") if hasattr(mlp, name))
    inputs = weights.matmul(x, [f"{prefix}.{p}" for p in arch.mlp_in], f"{prefix}/mlp_in")
    if arch.fused_gate_up:  # Phi-3: one projection gives gate | up
        inputs = b.add("Split", [inputs[0], b.constant([mlp.down_proj.in_features] * 2)], f"{prefix}/gate_up", 2,
                       axis=-1)
    hidden = _activation(b, inputs[0], activation, f"{prefix}/act")
    if arch.gated:
        hidden = b.add("Mul", [hidden, inputs[1]], f"{prefix}/gated")[0]
    return weights.matmul(hidden, [f"{prefix}.{arch.mlp_out}"], f"{prefix}/mlp_out")[0]


MASK_NODES = 6  # attention_mask -> seqlens_k and total_sequence_length
POSITION_NODES = 5  # learned positions: this call's positions from the mask and the ids, gathered and added
SILU_NODES = 2  # Sigmoid, Mul (a GELU is one node)


def node_count(spec: ModelSpec, ranks: dict[str, int | None], precision: str, kv_cache: str = "fp32",
               pruned_vocabulary: bool = False) -> int:
    """Nodes of the graph `build_decoder` makes for these per-projection ranks (None: dense), counted from its
    structure so the planner can price dispatch without building anything (tests check it against real graphs
    of every family). A factorized projection adds its second matmul; factorizing q, k or v (as separate
    projections) splits their stacked output; an fp16 KV cache casts attention's inputs and output."""
    arch, num_layers = arch_for(spec.model_type), spec.num_layers
    separate_qkv = len(arch.qkv) == 3
    block = 2 + 4 + 1  # norms; matmuls for q|k|v, attention output, MLP in and out; attention
    block += (SILU_NODES if spec.activation == "silu" else 1) + int(arch.gated) + int(len(arch.mlp_in) == 2)
    block += int(arch.fused_gate_up) + int(bool(arch.attention_out_norm)) + int(bool(arch.mlp_out_norm))
    block += (1 + 2 * 3) if arch.qk_norm else 0  # split q|k|v; reshape, norm, reshape for q and k
    nodes = MASK_NODES + 1 + int(arch.scaled_embedding) + (POSITION_NODES if arch.positions else 0)
    nodes += num_layers * block + 1 + 1 + (1 if precision != "fp32" else 5)  # final norm, slice, lm_head
    nodes += 3 if spec.logit_softcap else 0
    nodes += 3 if pruned_vocabulary else 0  # token -> row; the bias and the gather back to token ids
    factorized = [name for name, rank in ranks.items() if rank is not None]
    nodes += len(factorized)
    qkv_names = {name.rsplit(".", 1)[-1] for name in arch.qkv}
    split_blocks = set()
    if separate_qkv and not arch.qk_norm:
        split_blocks = {name.split(".")[len(arch.blocks.split("."))] for name in factorized
                        if name.rsplit(".", 1)[-1] in qkv_names}
    nodes += len(split_blocks)
    if kv_cache == "fp16":
        packed = 1 if not separate_qkv or not arch.qk_norm else 3
        nodes += num_layers * (packed + 1) + 2 * len(split_blocks)
    if precision == "fp32":  # MatMul has no bias input: one Add per biased matmul
        nodes += _bias_adds(spec, arch, ranks)
    return nodes


def _bias_adds(spec: ModelSpec, arch: ArchSpec, ranks: dict[str, int | None]) -> int:
    """Biased fp32 matmuls: a stacked first stage with any dense biased member, and each biased second factor."""
    biased = {layer.name for layer in spec.layers if layer.bias}
    adds = 0
    for i in range(spec.num_layers):
        for group in (arch.qkv, (arch.attention_out,), arch.mlp_in, (arch.mlp_out,)):
            names = [f"{arch.blocks}.{i}.{name}" for name in group]
            adds += any(n in biased and ranks.get(n) is None for n in names)
            adds += sum(n in biased and ranks.get(n) is not None for n in names)
    return adds


def all_positions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with logits for every position (the last-position Slice bypassed): for scoring text."""
    twin = onnx.ModelProto()
    twin.CopyFrom(proto)
    nodes = [node for node in twin.graph.node if node.name != "last_position"]
    for node in nodes:
        node.input[:] = [ALL_HIDDEN if name == LAST_HIDDEN else name for name in node.input]
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    twin.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    used = {name for node in nodes for name in node.input}
    kept = [init for init in twin.graph.initializer if init.name in used]
    del twin.graph.initializer[:]
    twin.graph.initializer.extend(kept)
    return twin


def stage_starts(proto: onnx.ModelProto) -> list[int]:
    """The indices of the nodes where each block and the head (final norm to logits) begin: a graph cut there
    passes on only the residual stream and the attention's lengths from the mask (exporter.segments)."""
    return [i for i, node in enumerate(proto.graph.node) if node.name.endswith(BLOCK_START) or node.name == FINAL_NORM]


def _embedding(b: _Builder, model: nn.Module, arch: ArchSpec, quantized: dict[str, Int4Matrix] | None) -> str:
    """Token embeddings (scaled, for Gemma), plus learned position embeddings (GPT-2)."""
    table = model.get_input_embeddings()
    tied = table.weight is model.get_output_embeddings().weight
    path = "lm_head" if tied else next(name for name, module in model.named_modules() if module is table)
    ids = "input_ids"
    if isinstance(table, PrunedEmbedding):  # token id -> kept row (or the bucket row)
        ids = b.add("Gather", [_vocabulary_index(b, table), "input_ids"], "vocabulary/rows")[0]
    if quantized is None:
        name = "lm_head.table" if tied else f"{path}.table"  # (vocab, hidden), shared with the lm_head's Gemm
        hidden = b.add("Gather", [b.weight(name, table.weight.detach().float().numpy()), ids], "embedding")[0]
    else:
        matrix = quantized[path]
        _, scales, zeros = _Weights(model, b, quantized)._int4_inputs(path, [matrix])
        # the same bytes as the matmul's (N, blocks, 16) table, as the (N, K/2) rows the gather reads: stored once
        # in the data file (exporter.export.save), read in place by both, so no copy is made at load time either
        rows = b.weight(f"{path}.rows", matrix.packed_weights().reshape(matrix.n, -1))
        hidden = b.add("GatherBlockQuantized", [rows, ids, scales, zeros], "embedding", domain=MS, bits=4,
                       block_size=QUANT_BLOCK, gather_axis=0, quantize_axis=1)[0]
    if arch.scaled_embedding:
        scale = b.weight("embedding.scale", np.array(model.config.hidden_size**0.5, dtype=np.float32))
        hidden = b.add("Mul", [hidden, scale], "embedding/scale")[0]
    if arch.positions:  # the rows of this call's positions: total length - new tokens ... total length - 1
        new_tokens = b.add("Shape", ["input_ids"], "positions/new_tokens", start=1, end=2)[0]
        total = b.add("Shape", ["attention_mask"], "positions/total", start=1, end=2)[0]
        first = b.add("Sub", [total, new_tokens], "positions/first")[0]
        table = b.weight(f"{arch.positions}.weight", model.get_submodule(arch.positions).weight.detach().numpy())
        rows = b.add("Slice", [table, first, total, b.constant([0])], "positions")[0]
        hidden = b.add("Add", [hidden, rows], "embedding/positions")[0]
    return hidden


def _lm_head(b: _Builder, weights: _Weights, model: nn.Module, quantized, hidden: str, level: int) -> None:
    """Logits from the last hidden state; Gemma 2's are soft-capped: tanh(logits / cap) x cap."""
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    cap = getattr(model.config, "final_logit_softcapping", None)
    pruned = isinstance(head, PrunedHead)
    output = "lm_head/logits" if cap or pruned else "logits"
    if quantized is not None and tied:  # the embedding already added the lm_head's int4 table under this key
        matrix = quantized["lm_head"]
        b.add("MatMulNBits", [hidden, "lm_head.qweight", "lm_head.scales", "lm_head.zero_points"], "lm_head",
              [output], domain=MS, K=matrix.k, N=matrix.n, bits=4, block_size=QUANT_BLOCK, accuracy_level=level)
    elif quantized is not None:  # (a pruned head's bias is added below, with the bucket's)
        weights._linear(hidden, [("lm_head", head)], None if pruned else head.bias, "lm_head", level)
        b.nodes[-1].output[0] = output
    else:  # fp32: Gemm reads the (vocab, hidden) table transposed, so a tied table is stored once
        table = "lm_head.table" if tied else b.weight("lm_head.table", head.weight.detach().float().numpy())
        shape = b.add("Shape", [hidden], "lm_head/shape", end=2)[0]
        flat = b.add("Reshape", [hidden, b.constant([-1, head.in_features])], "lm_head/flatten")[0]
        logits = b.add("Gemm", [flat, table], "lm_head/gemm", transB=1)[0]
        out_shape = b.add("Concat", [shape, b.constant([head.weight.shape[0]])], "lm_head/out_shape", axis=0)[0]
        b.add("Reshape", [logits, out_shape], "lm_head", [output])
    if pruned:  # kept rows and the bucket's, then every token id's logit from its row's
        biased = b.add("Add", [output, b.weight("lm_head.bias", head.bias.float().numpy())], "vocabulary/bias")[0]
        output = "lm_head/vocabulary" if cap else "logits"
        b.add("Gather", [biased, _vocabulary_index(b, head)], "vocabulary/logits", [output], axis=-1)
    if cap:
        cap_value = b.weight("lm_head.softcap", np.array(cap, dtype=np.float32))
        squashed = b.add("Tanh", [b.add("Div", [output, cap_value], "softcap/div")[0]], "softcap/tanh")[0]
        b.add("Mul", [squashed, cap_value], "softcap", ["logits"])


def _vocabulary_index(b: _Builder, module: nn.Module) -> str:
    """token id -> row of the kept vocabulary, int32 (one table for the embedding and the lm_head)."""
    if "vocabulary.index" not in {init.name for init in b.initializers}:
        b.weight("vocabulary.index", module.index.numpy().astype(np.int32))
    return "vocabulary.index"


def _norm(b: _Builder, arch: ArchSpec, residual: str, delta: str | None, norm: nn.Module, name: str,
          output: str | None = None) -> tuple[str, str]:
    """Norm of residual (+ delta), RMS or Layer: (normalized, the new residual). With a delta the add is fused
    into the norm (Skip*LayerNormalization)."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    weight = b.weight(f"{name}.weight", norm.weight.detach().float().numpy() + arch.norm_offset)
    inputs = [weight] if arch.norm == "rms" else [weight, b.weight(f"{name}.bias", norm.bias.detach().float().numpy())]
    out = output or f"{name}/out0"
    if delta is None:
        op = "SimplifiedLayerNormalization" if arch.norm == "rms" else "LayerNormalization"
        b.add(op, [residual, *inputs], name, [out], axis=-1, epsilon=eps, stash_type=1)
        return out, residual
    summed = f"{name}/residual"
    op = "SkipSimplifiedLayerNormalization" if arch.norm == "rms" else "SkipLayerNormalization"
    b.add(op, [residual, delta, *inputs], name, [out, "", "", summed], domain=MS, epsilon=eps)
    return out, summed


def _head_norm(b: _Builder, arch: ArchSpec, x: str, norm: nn.Module, name: str) -> str:
    """RMSNorm over each head: (batch, seq, heads x head_dim) viewed as (batch, seq, heads, head_dim)."""
    head_dim = norm.weight.shape[0]
    heads = b.add("Reshape", [x, b.constant([0, 0, -1, head_dim])], f"{name}/heads")[0]
    normed, _ = _norm(b, arch, heads, None, norm, name)
    return b.add("Reshape", [normed, b.constant([0, 0, -1])], f"{name}/flat")[0]


def _activation(b: _Builder, x: str, module: nn.Module, name: str) -> str:
    kind = type(module).__name__
    if kind in ("SiLUActivation", "SiLU"):
        sigmoid = b.add("Sigmoid", [x], f"{name}/sigmoid")[0]
        return b.add("Mul", [x, sigmoid], name)[0]
    if kind in ("GELUTanh", "NewGELUActivation", "PytorchGELUTanh", "GELUActivation", "GELU"):
        exact = kind in ("GELUActivation", "GELU") and getattr(module, "approximate", "none") == "none"
        return b.add("Gelu", [x], name, approximate="none" if exact else "tanh")[0]
    raise UsageError(f"activation {kind} is not supported by the graph builder; supported: SiLU and GELU")


def activation_kind(model: nn.Module, arch: ArchSpec) -> str:
    """"silu" or "gelu": what `_activation` builds for this model (node counts differ)."""
    block = model.get_submodule(arch.blocks)[0]
    mlp = block.get_submodule(arch.mlp_out.rsplit(".", 1)[0])
    module = next(getattr(mlp, name) for name in ("act_fn", "activation_fn", "act") if hasattr(mlp, name))
    return "silu" if "SiLU" in type(module).__name__ else "gelu"


def _rotary_caches(b: _Builder, rotary: nn.Module, length: int, dtype: str, prefix: str) -> tuple[str, str]:
    """cos and sin of position x inverse frequency (length x rotary_dim/2), scaled as the model scales them, in
    the attention's type."""
    positions = torch.arange(length, dtype=torch.float32)
    angles = torch.outer(positions, rotary.inv_freq.float())
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    numpy_type = np.float16 if dtype == "fp16" else np.float32
    return (b.weight(f"{prefix}cos_cache", (angles.cos() * scaling).numpy().astype(numpy_type)),
            b.weight(f"{prefix}sin_cache", (angles.sin() * scaling).numpy().astype(numpy_type)))
