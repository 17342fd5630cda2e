"""The PyTorch mirror of onnxruntime's weight quantizer must round exactly as the quantizer does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporter.quantize import quantize_graph, round_trip


def single_matmul(path, weight: np.ndarray) -> None:
    k = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))


@pytest.mark.parametrize(("k", "n"), [(64, 48), (40, 24), (8, 16), (160, 64)])
def test_round_trip_matches_onnxruntime(tmp_path, k, n):
    rng = np.random.default_rng(k * n)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    single_matmul(tmp_path / "m.onnx", weight)
    quantized = quantize_graph(tmp_path / "m.onnx", "int4")
    assert {node.op_type for node in quantized.graph.node} == {"MatMulNBits"}
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.eye(k, dtype=np.float32)  # identity input: the output *is* the dequantized weight
    dequantized = session.run(None, {"x": x})[0]
    mirror = round_trip(torch.from_numpy(weight.T.copy()), 4, "mlas").numpy().T
    np.testing.assert_array_equal(dequantized, mirror)
    assert not np.allclose(mirror, weight)  # it did quantize


def tied_values(shape, seed):
    """Weights on a grid where x / scale + zero point lands exactly on .5 for many entries."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 31, size=shape).astype(np.float32)
    levels[:, :1], levels[:, 1:2] = 0, 30  # each block spans [-15h, 15h]: scale 2h, halves everywhere
    return (levels - 15) * np.float32(1 / 64)


def test_matmul_rounding_of_exact_halves(tmp_path):
    weight = tied_values((64, 16), 0)
    single_matmul(tmp_path / "m.onnx", weight)
    quantized = quantize_graph(tmp_path / "m.onnx", "int4")
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    dequantized = session.run(None, {"x": np.eye(64, dtype=np.float32)})[0]
    mlas = round_trip(torch.from_numpy(weight.T.copy()), 4, "mlas").numpy().T
    numpy_rounding = round_trip(torch.from_numpy(weight.T.copy()), 4, "numpy").numpy().T
    np.testing.assert_array_equal(dequantized, mlas)
    assert not np.array_equal(mlas, numpy_rounding)  # the case really distinguishes the two conventions


def test_embedding_rounding_matches_gather_quantizer(tmp_path):
    table = tied_values((40, 64), 1)  # (vocab, hidden): blocks along hidden
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "g.onnx"))
    quantized = quantize_graph(tmp_path / "g.onnx", "int4")
    assert {node.op_type for node in quantized.graph.node} == {"GatherBlockQuantized"}
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    dequantized = session.run(None, {"ids": np.arange(40, dtype=np.int64)})[0]
    np.testing.assert_array_equal(dequantized, round_trip(torch.from_numpy(table), 4, "numpy").numpy())


@pytest.mark.parametrize("rounding", ["mlas", "numpy"])
def test_round_trip_keeps_zero_blocks(rounding):
    weight = torch.zeros(3, 40)
    assert torch.equal(round_trip(weight, 4, rounding), weight)
