"""The graph builder for every supported family: parity with PyTorch through the KV cache, int4 weights exactly as
the PyTorch mirror holds them, node counts as the planner predicts them, and the runtime layouts (shared KV buffer,
fp16 cache, all-position logits, one stored table)."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import build_tiny

from exporter.contracts import LayerPlan, RankPlan
from exporter.export import save, save_variant
from exporter.factorize import factorize_
from exporter.generate import OnnxDecoder, TorchDecoder
from exporter.graph import GraphOptions, all_positions, build_decoder, node_count, past_names, present_names
from exporter.measure import SharedCache, session
from exporter.models import describe, normalize_
from exporter.quantize import apply_, quantize_model
from exporter.segments import SegmentedGraph, segment_ranges
from exporter.select import get_method
from exporter.validate import greedy_trace
from exporter.vocabulary import prune_vocabulary_

FAMILIES = ["llama", "qwen2", "gpt2", "mistral", "phi3", "gemma", "gemma3_text"]


def factorized(model, every: int = 2):
    """Every `every`-th projection at rank 8: a mix of dense and factorized layers, q/k/v included."""
    spec = describe(model)
    layers = tuple(LayerPlan(layer.name, layer.d_in, layer.d_out, 8 if i % every == 0 else None)
                   for i, layer in enumerate(spec.layers))
    factorize_(model, RankPlan("t", "fp32", 0.5, 8, layers, None, None), get_method("svd"), {})
    return {layer.name: layer.rank for layer in layers}


def onnx_session(proto, tmp_path, name="m.onnx"):
    save(proto, tmp_path / name)
    return session(str(tmp_path / name), "CPUExecutionProvider", 1)


def assert_same_generation(model, sess, ids, relative=1e-4):
    ref_logits, ref_tokens = greedy_trace(TorchDecoder(model), ids)
    logits, tokens = greedy_trace(OnnxDecoder(sess), ids)
    assert tokens == ref_tokens
    assert abs(logits - ref_logits).max() <= relative * max(1.0, abs(ref_logits).max())


def prompt():
    torch.manual_seed(1)
    return torch.randint(2, 300, (1, 40))  # longer than gemma3's sliding window of 32


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("factorize", [False, True])
def test_fp32_graph_matches_pytorch_through_the_cache(tmp_path, family, factorize):
    model = normalize_(build_tiny(family))
    ranks = factorized(model) if factorize else {layer.name: None for layer in describe(model).layers}
    spec = describe(model)
    proto = build_decoder(model, spec, GraphOptions(128))
    assert len(proto.graph.node) == node_count(spec, ranks, "fp32")
    sess = onnx_session(proto, tmp_path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", *past_names(spec.num_layers)]
    assert [o.name for o in sess.get_outputs()] == ["logits", *present_names(spec.num_layers)]
    assert_same_generation(model, sess, prompt())


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_graph_holds_exactly_the_mirrors_weights(tmp_path, family):
    model = normalize_(build_tiny(family))
    ranks = factorized(model, every=3)
    spec = describe(model)
    quantized = quantize_model(model)
    proto = build_decoder(model, spec, GraphOptions(128), quantized)
    assert len(proto.graph.node) == node_count(spec, ranks, "int4")
    mirror = apply_(copy.deepcopy(model), quantized)
    assert_same_generation(mirror, onnx_session(proto, tmp_path), prompt())
    logits = greedy_trace(TorchDecoder(model), prompt())[0]
    assert abs(greedy_trace(TorchDecoder(mirror), prompt())[0] - logits).max() > 1e-3  # it did quantize


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_fp16_cache_and_int8_activations_stay_close(tmp_path, family):
    model = normalize_(build_tiny(family))
    ranks = factorized(model, every=3)
    spec = describe(model)
    quantized = quantize_model(model)
    mirror = apply_(copy.deepcopy(model), quantized)
    proto = build_decoder(model, spec, GraphOptions(128, "int8", "fp16"), quantized)
    assert len(proto.graph.node) == node_count(spec, ranks, "int4", "fp16")
    sess = onnx_session(proto, tmp_path)
    assert sess.get_inputs()[2].type == "tensor(float16)"
    ref_logits, _ = greedy_trace(TorchDecoder(mirror), prompt())
    logits, _ = greedy_trace(OnnxDecoder(sess), prompt())
    assert abs(logits[0] - ref_logits[0]).max() <= 0.05 * abs(ref_logits[0]).max()  # inexact, but close


def test_shared_kv_buffer_gives_the_same_logits(tmp_path):
    model = build_tiny("llama")
    spec = describe(model)
    sess = onnx_session(build_decoder(model, spec, GraphOptions(128)), tmp_path)
    ids = prompt()[0].tolist()
    growing = OnnxDecoder(sess)
    expected = [growing.start(ids[:20]), growing.step(ids[20]), growing.step(ids[21])]
    shared = SharedCache(sess, 128)
    got = [shared.run(np.array([ids[:20]]), 0)[0, -1], shared.run(np.array([[ids[20]]]), 20)[0, -1],
           shared.run(np.array([[ids[21]]]), 21)[0, -1]]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_all_positions_variant_scores_every_token(tmp_path):
    model = build_tiny("qwen2")
    spec = describe(model)
    proto = build_decoder(model, spec, GraphOptions(128))
    save(proto, tmp_path / "m.onnx")
    save_variant(all_positions(proto), tmp_path / "all.onnx")  # reads m.onnx.data
    sess = ort.InferenceSession(str(tmp_path / "all.onnx"), providers=["CPUExecutionProvider"])
    ids = prompt()
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
            **{n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32) for n in past_names(2)}}
    logits = sess.run(["logits"], feed)[0][0]
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_graph_run_a_block_at_a_time_gives_the_whole_graphs_logits(tmp_path, family, precision):
    model = normalize_(build_tiny(family))
    factorized(model, every=3)
    spec = describe(model)
    quantized = quantize_model(model) if precision == "int4" else None
    options = GraphOptions(256, "int8", "fp16") if quantized else GraphOptions(256)
    proto = build_decoder(model, spec, options, quantized)
    save(proto, tmp_path / "m.onnx")
    save_variant(all_positions(proto), tmp_path / "all.onnx")
    whole = session(str(tmp_path / "all.onnx"), "CPUExecutionProvider", 1)
    torch.manual_seed(2)
    sequences = [prompt()[0].tolist(), torch.randint(2, 300, (250,)).tolist()]  # 250: two runs of the head
    expected = [whole.run(["logits"], {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
                                       **{i.name: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim),
                                                           np.float16 if quantized else np.float32)
                                          for i in whole.get_inputs()[2:]}})[0][0] for ids in sequences]
    graph = SegmentedGraph(str(tmp_path / "all.onnx"), "CPUExecutionProvider", 1, max_bytes=1)
    assert len(graph.ranges) == spec.num_layers + 1  # a block a segment, and the head
    assert len(segment_ranges(proto)) == 2  # the blocks fit one segment, then the head
    got: list[list[np.ndarray]] = [[], []]
    for index, first, logits in graph.logits(sequences):
        assert first == sum(len(piece) for piece in got[index])
        got[index].append(logits)
    for pieces, logits in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.concatenate(pieces), logits)  # the same kernels on the same inputs
    assert not graph.fell_back


def test_tied_int4_table_is_stored_once(tmp_path):
    model = build_tiny("llama")  # tied embedding and lm_head
    spec = describe(model)
    quantized = quantize_model(model)
    proto = build_decoder(model, spec, GraphOptions(128), quantized)
    tensors = {init.name: len(init.raw_data) for init in proto.graph.initializer}
    save(proto, tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx.data").stat().st_size
    assert tensors["lm_head.rows"] == tensors["lm_head.qweight"] > 1024
    assert data < sum(size for size in tensors.values() if size >= 1024) - tensors["lm_head.rows"] + 64 * len(tensors)
    assert {n.op_type for n in proto.graph.node} >= {"GatherBlockQuantized", "MatMulNBits", "GroupQueryAttention"}


def test_mistral_sliding_window_matches(tmp_path):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("mistral")
    config.sliding_window = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    sess = onnx_session(build_decoder(model, describe(model), GraphOptions(128)), tmp_path)
    assert_same_generation(model, sess, prompt())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2"])
def test_pruned_vocabulary_matches_pytorch(tmp_path, family):
    model = normalize_(build_tiny(family))
    ranks = factorized(model, every=4)
    spec = describe(model)
    prune_vocabulary_(model, list(range(2, 200)))  # tokens 0, 1 and 200-319 share the bucket row
    assert model.get_input_embeddings().weight.shape[0] == 199
    for precision, quantized in (("fp32", None), ("int4", quantize_model(model))):
        proto = build_decoder(model, spec, GraphOptions(128), quantized)
        assert len(proto.graph.node) == node_count(spec, ranks, precision, pruned_vocabulary=True)
        reference = model if quantized is None else apply_(copy.deepcopy(model), quantized)
        sess = onnx_session(proto, tmp_path, f"{precision}.onnx")
        assert_same_generation(reference, sess, prompt())
    logits = TorchDecoder(model).start(prompt()[0].tolist())
    assert len(logits) == spec.vocab_size and len(set(logits[200:].tolist())) == 1  # dropped tokens: one logit
