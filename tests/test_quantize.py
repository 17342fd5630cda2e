"""The int4 format: round-to-nearest exactly as onnxruntime's quantizer, GPTQ on the same grid, and the model-wide
rounding that the graph and its PyTorch mirror share."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import build_tiny
from onnx import TensorProto, helper, numpy_helper

from exporter.calibration import Calibration
from exporter.collect import activation_stats, grams_on_disk
from exporter.contracts import LayerPlan, RankPlan
from exporter.factorize import factorize_
from exporter.models import describe
from exporter.quantize import Int4Matrix, apply_, gptq, int4_bytes, quantize_model, quantize_modules, round_to_nearest
from exporter.select import get_method


def onnxruntime_quantized(weight: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime's own MatMulNBits quantizer on one MatMul (weight K x N): its initializers by suffix."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")],
    )
    quantizer = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]),
                                     bits=4, block_size=32, is_symmetric=False)
    quantizer.process()
    model = quantizer.model.model
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    found = {init.name.rsplit("_", 1)[-1]: numpy_helper.to_array(init) for init in model.graph.initializer}
    found["dequantized"] = session.run(None, {"x": np.eye(k, dtype=np.float32)})[0].T  # identity input
    return found


@pytest.mark.parametrize(("k", "n"), [(64, 48), (576, 96), (40, 24), (160, 64)])
def test_round_to_nearest_is_onnxruntimes_quantizer(k, n):
    rng = np.random.default_rng(k * n)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    ours = round_to_nearest(torch.from_numpy(weight.T.copy()))
    theirs = onnxruntime_quantized(weight)
    np.testing.assert_array_equal(ours.dequantize().numpy(), theirs["dequantized"])
    np.testing.assert_array_equal(ours.scale.numpy().reshape(-1), theirs["scales"].reshape(-1))
    if k % 32 == 0:  # full blocks: the same bytes (a partial block's padding and an odd block's pad nibble differ)
        np.testing.assert_array_equal(ours.packed_weights(), theirs["Q4"])
        if (k // 32) % 2 == 0:
            np.testing.assert_array_equal(ours.packed_zero_points().reshape(-1), theirs["points"].reshape(-1))
    assert not np.allclose(ours.dequantize().numpy(), weight.T)  # it did quantize


def test_exact_halves_round_away_from_zero_as_c_does():
    levels = np.random.default_rng(0).integers(0, 31, size=(16, 64)).astype(np.float32)
    levels[:, :1], levels[:, 1:2] = 0, 30  # each block spans [-15h, 15h]: scale 2h, many exact halves
    weight = (levels - 15) * np.float32(1 / 64)
    np.testing.assert_array_equal(round_to_nearest(torch.from_numpy(weight)).dequantize().numpy(),
                                  onnxruntime_quantized(weight.T.copy())["dequantized"])


def test_zero_blocks_and_padding_hold_zero():
    matrix = round_to_nearest(torch.zeros(3, 40))
    assert torch.equal(matrix.dequantize(), torch.zeros(3, 40))
    assert matrix.levels().shape == (3, 64) and matrix.nbytes() == int4_bytes(3, 40)
    padded = round_to_nearest(torch.randn(2, 40))
    assert torch.equal(padded.levels()[:, 40:], padded.zero[:, 1:2].expand(2, 24))  # padding = zero point: value 0


def correlated_inputs(n=2048, d=128, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, d) @ torch.randn(d, d) * 0.1
    return x, (x.T @ x / n).double()


def test_gptq_lowers_the_output_error_on_its_inputs():
    x, gram = correlated_inputs()
    weight = torch.randn(64, 128) * 0.05
    errors = {name: float(((x @ (weight - matrix.dequantize()).T) ** 2).mean())
              for name, matrix in (("nearest", round_to_nearest(weight)), ("gptq", gptq(weight, gram)))}
    assert errors["gptq"] < 0.8 * errors["nearest"]
    matrix = gptq(weight, gram)
    assert int(matrix.levels().max()) <= 15 and matrix.packed.shape == (64, 64)
    rebuilt = Int4Matrix(matrix.packed, matrix.scale, matrix.zero, matrix.k).dequantize()
    assert torch.equal(rebuilt, matrix.dequantize())


def test_error_weights_are_the_references_factor_of_the_inverse_hessian():
    from exporter.quantize import GPTQ_DAMPING, _factor_rows, _inverse_factor

    _, gram = correlated_inputs(d=70)
    gram[3], gram[:, 3] = 0, 0  # an input that is always zero
    hessian = gram.clone()
    hessian[3, 3] = 1
    hessian.diagonal().add_(GPTQ_DAMPING * float(hessian.diagonal().mean()))
    reference = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True)  # GPTQ's: H^-1 = U^T U
    factor = _inverse_factor(gram.float())
    assert torch.allclose(_factor_rows(factor, 0, 70).double().triu(), reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(_factor_rows(factor, 32, 64), _factor_rows(factor, 0, 70)[32:64])


def test_rows_are_rounded_in_pieces_exactly_as_all_at_once(monkeypatch):
    from exporter import quantize

    _, gram = correlated_inputs(d=130)  # and a partial last block
    weight = torch.randn(100, 130) * 0.05  # rows never mix: pieces of 7 rows bound memory, change nothing
    whole, pieces = gptq(weight, gram), gptq(weight, gram, rows=7)
    assert torch.equal(whole.packed, pieces.packed) and torch.equal(whole.zero, pieces.zero)
    assert torch.allclose(whole.scale, pieces.scale, rtol=1e-5, atol=1e-7)  # matmuls of other sizes: ulps
    whole = round_to_nearest(weight)
    monkeypatch.setattr(quantize, "ELEMENTS_AT_ONCE", 7 * 130)
    pieces = round_to_nearest(weight)
    assert all(torch.equal(a, b) for a, b in ((whole.packed, pieces.packed), (whole.scale, pieces.scale),
                                              (whole.zero, pieces.zero)))


def test_factorized_layers_are_rounded_with_a_refitted_second_factor():
    model = build_tiny("llama")
    name = "model.layers.0.mlp.down_proj"
    spec = describe(model)
    layers = tuple(LayerPlan(layer.name, layer.d_in, layer.d_out, 32 if layer.name == name else None)
                   for layer in spec.layers)
    factorize_(model, RankPlan("t", "int4", 0.5, 32, layers, None, None), get_method("svd"), {})
    torch.manual_seed(0)
    batches = tuple(torch.randint(2, 300, (1, 64)) for _ in range(4))
    stats = activation_stats(model, Calibration(batches, "t"), [layer.name for layer in spec.layers] + ["lm_head"])
    inputs = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    x = torch.cat(inputs).reshape(-1, inputs[0].shape[-1])
    layer = model.get_submodule(name)
    exact = layer(x).detach()

    def error(quantized) -> float:
        first, second = quantized[f"{name}.first"].dequantize(), quantized[f"{name}.second"].dequantize()
        return float(((x @ first.T @ second.T - exact) ** 2).mean())

    assert error(quantize_model(model, stats)) < 0.8 * error(quantize_model(model))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_consumed_block_rounds_as_a_kept_one_and_frees_its_statistics_and_weights(family):
    """A streamed block is rounded with `consume`, its Gram matrices on disk: the same int4 bytes (a factorized
    layer's too, whose Gram matrix is read twice), the block's layers taken out of the statistics, its Linear
    weights dropped (biases kept) until `apply_` writes them back dequantized."""
    model = build_tiny(family)
    prefix = "model.layers.0"
    layers = [layer for layer in describe(model).layers if layer.name.startswith(prefix + ".")]
    factorized = {f"{prefix}.self_attn.q_proj", f"{prefix}.mlp.down_proj"}  # q shares its entry with k and v
    plan_layers = tuple(LayerPlan(layer.name, layer.d_in, layer.d_out, 32 if layer.name in factorized else None)
                        for layer in layers)
    factorize_(model, RankPlan("t", "int4", 0.5, 32, plan_layers, None, None), get_method("svd"), {})
    torch.manual_seed(0)
    names = [layer.name for layer in layers]
    stats = activation_stats(model, Calibration(tuple(torch.randint(2, 300, (1, 64)) for _ in range(4)), "t"), names)
    kept = quantize_modules(model.get_submodule(prefix), stats, prefix)
    with pytest.raises(ValueError, match="grams_on_disk"):
        quantize_modules(model.get_submodule(prefix), stats, prefix, consume=True)
    stored = grams_on_disk(stats)
    consumed = quantize_modules(model.get_submodule(prefix), stored, prefix, consume=True)
    assert set(consumed) == set(kept) and len(kept) == len(names) + len(factorized) and not stored
    assert all(torch.equal(consumed[n].packed, kept[n].packed) and torch.equal(consumed[n].scale, kept[n].scale)
               for n in kept)
    linears = [model.get_submodule(name) for name in kept]
    assert all(linear.weight.is_meta for linear in linears)
    assert all(not linear.bias.is_meta for linear in linears if linear.bias is not None)
    apply_(model, consumed)
    assert all(torch.equal(model.get_submodule(name).weight, consumed[name].dequantize()) for name in kept)


def test_a_gram_matrix_on_disk_is_read_afresh_each_time():
    """Each read is a copy of its own (a reader may free it) of the same values; shared entries stay shared."""
    gram = torch.randn(6, 6)
    shared = {"gram": gram, "abs_mean": torch.rand(6)}
    stored = grams_on_disk({"q": shared, "k": shared, "o": {"gram": gram.T, "abs_mean": torch.rand(6)}})
    assert stored["q"] is stored["k"] and stored["q"] is not stored["o"]
    first, second = stored["q"]["gram"], stored["q"]["gram"]
    assert torch.equal(first, gram) and torch.equal(stored["o"]["gram"], gram.T)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    first.untyped_storage().resize_(0)  # what GPTQ's `consume` does to what it read
    assert torch.equal(stored["q"]["gram"], gram) and torch.equal(stored["q"]["abs_mean"], shared["abs_mean"])
    assert sorted(stored["o"]) == ["abs_mean", "gram"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mirror_holds_every_quantized_weight(family):
    model = build_tiny(family)
    spec = describe(model)
    layers = tuple(LayerPlan(layer.name, layer.d_in, layer.d_out, 8 if i % 3 == 0 else None)
                   for i, layer in enumerate(spec.layers))
    factorize_(model, RankPlan("t", "int4", 0.5, 8, layers, None, None), get_method("svd"), {})
    quantized = quantize_model(model)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = linears | ({"model.embed_tokens"} if not spec.tied_embeddings else set())
    assert set(quantized) == expected
    mirror = apply_(copy.deepcopy(model), quantized)
    for name, matrix in quantized.items():
        assert torch.equal(mirror.get_submodule(name).weight, matrix.dequantize())
    if spec.tied_embeddings:
        assert mirror.get_input_embeddings().weight is mirror.get_output_embeddings().weight
