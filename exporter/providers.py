"""Which of a profile's execution providers can run the exported graph, and which operators each would leave to the CPU.

onnxruntime silently hands every node a provider cannot take to CPUExecutionProvider. On a phone that is not an
error, but it decides what actually runs: a profile that lists XNNPACK first and ships an int4 graph gets the CPU
provider's int4 kernels for every matmul, because XNNPACK has no MatMulNBits. This module says so before and after
the export, from each provider's operator list:

- NNAPI and CoreML: the lists onnxruntime ships with its mobile usability checker
  (`onnxruntime/tools/mobile_helpers/*.md`); that checker's partitioning counts the pieces the graph would be cut
  into, for every provider here.
- XNNPACK and QNN: onnxruntime ships no list, so the operators below are transcribed from onnxruntime's source
  (`core/providers/xnnpack/detail/node_support_checker.cc`, `core/providers/qnn/builder/op_builder_factory.cc`) and
  run through the same partition count. Both are checked by operator type only; QNN's HTP backend also needs fixed
  input shapes and a QDQ-quantized graph, which this decoder (dynamic sequence length, int4 MatMulNBits) is not.
- CPU: runs every operator of an edgeslim graph (the export's own validation measures this: bench_on_device
  records the provider of every node).
- Any other provider: no list here; the report says to run bench_on_device on the device to see the placement.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import onnx
import onnxruntime
from onnxruntime.tools.mobile_helpers import usability_checker

from exporter.contracts import DeviceProfile, ProviderFit

CPU = "CPUExecutionProvider"
MS = "com.microsoft"

# ONNX-domain operators the XNNPACK provider claims (NodeSupportChecker::IsNodeSupported, onnxruntime main).
XNNPACK_OPERATORS = frozenset(f"ai.onnx:{op}" for op in (
    "Conv", "ConvTranspose", "QLinearConv", "MaxPool", "AveragePool", "Softmax", "Resize", "Gemm", "MatMul"))
# Operators the QNN provider has a builder for (OpBuilderRegistrations, onnxruntime main).
QNN_OPERATORS = frozenset([f"ai.onnx:{op}" for op in (
    "Add", "Asin", "Atan", "Mul", "Abs", "And", "Ceil", "Cos", "Sign", "Div", "Equal", "Exp", "Floor", "Greater",
    "GreaterOrEqual", "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Min", "Neg", "Not", "Or", "Pow", "PRelu",
    "Relu", "Gelu", "Elu", "Round", "Where", "ScatterND", "Sigmoid", "Sin", "Sqrt", "Sub", "Sum", "Tanh", "Concat",
    "QuantizeLinear", "DequantizeLinear", "HardSwish", "HardSigmoid", "DepthToSpace", "SpaceToDepth", "GridSample",
    "LpNormalization", "ScatterElements", "Softmax", "LogSoftmax", "Cast", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceL2", "Conv", "ConvTranspose", "GlobalAveragePool", "AveragePool", "MaxPool",
    "GlobalMaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gemm", "Gather", "GatherElements", "ArgMax",
    "ArgMin", "Clip", "Slice", "Split", "Resize", "Upsample", "TopK", "Tile", "InstanceNormalization",
    "BatchNormalization", "LayerNormalization", "RMSNormalization", "LRN", "Transpose", "Reciprocal", "Pad",
    "Expand", "Einsum", "MatMul", "Mean", "LSTM", "CumSum", "RandomUniformLike", "GatherND", "Mod",
    "ThresholdedRelu", "STFT", "Inverse",
)] + [f"{MS}:FusedMatMul"])

_SHIPPED_LISTS = {"NnapiExecutionProvider": "nnapi_supported_ops.md",
                  "CoreMLExecutionProvider": "coreml_supported_mlprogram_ops.md"}
_TRANSCRIBED = {"XnnpackExecutionProvider": XNNPACK_OPERATORS, "QNNExecutionProvider": QNN_OPERATORS}
_FIXED_SHAPES = {"QNNExecutionProvider": "QNN's HTP backend needs fixed input shapes and a QDQ-quantized graph"}


class _OperatorList:
    """The interface usability_checker.check_partitioning asks of a supported-operator list."""

    def __init__(self, operators: frozenset[str]):
        self.operators = operators

    def is_op_supported(self, node: onnx.NodeProto) -> bool:
        return f"{node.domain or 'ai.onnx'}:{node.op_type}" in self.operators

    def get_caveats(self) -> list[str]:
        return []


@functools.cache
def _operators(provider: str) -> frozenset[str] | None:
    """The "domain:Op" names `provider` runs; None when edgeslim has no list for it."""
    if provider in _TRANSCRIBED:
        return _TRANSCRIBED[provider]
    if provider not in _SHIPPED_LISTS:
        return None
    # a markdown table, one row per operator: |domain:Op|caveats|
    rows = Path(usability_checker.__file__).with_name(_SHIPPED_LISTS[provider]).read_text().splitlines()
    return frozenset(cells[1] for cells in (row.split("|") for row in rows) if len(cells) == 4 and ":" in cells[1])


def supported(provider: str, operator: str) -> bool | None:
    """Whether `provider` runs `operator` ("domain:Op"); None when edgeslim has no list for it."""
    if provider == CPU:
        return True
    operators = _operators(provider)
    return None if operators is None else operator in operators


def assess(graph: onnx.GraphProto, provider: str) -> ProviderFit:
    """What `provider` could take of `graph` (a graph loaded without its weights is enough)."""
    nodes, installed = len(graph.node), provider in onnxruntime.get_available_providers()
    if provider == CPU:
        return ProviderFit(provider, installed, True, nodes, nodes, 1, (), "runs every operator")
    operators = _operators(provider)
    if operators is None:
        return ProviderFit(provider, installed, False, nodes, 0, 0, (), "no operator list here: run "
                           "scripts/bench_on_device.py on the device, which records the provider of every node")
    logging.getLogger("usability_checker").setLevel(logging.WARNING)
    info = usability_checker.check_partitioning(graph, _OperatorList(operators), require_fixed_input_sizes=False,
                                                max_rank=5 if provider == "CoreMLExecutionProvider" else 999)
    unsupported = tuple(sorted(info.unsupported_ops))
    if info.num_supported_nodes == 0:
        summary = "takes no operator of this graph: everything runs on CPUExecutionProvider"
    else:
        verdict = {"YES": "worth trying", "MAYBE": "maybe worth trying", "NO": "not worth trying"}[
            info.suitability().name]  # onnxruntime's rule: few partitions covering most nodes
        summary = (f"could take {info.num_supported_nodes} of {nodes} nodes in {info.num_partitions} partitions "
                   f"({verdict}); {', '.join(op.split(':')[1] for op in unsupported)} stay on {CPU}")
    if provider in _FIXED_SHAPES:
        summary += f" ({_FIXED_SHAPES[provider]})"
    return ProviderFit(provider, installed, True, nodes, info.num_supported_nodes, info.num_partitions, unsupported,
                       summary)


MOBILE = ("XnnpackExecutionProvider", "NnapiExecutionProvider", "CoreMLExecutionProvider", "QNNExecutionProvider")


def assess_file(model_file: str | Path, requested: tuple[str, ...]) -> tuple[ProviderFit, ...]:
    """The profile's providers, then the mobile ones it does not list (so a report answers "what about XNNPACK?")."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return tuple(assess(graph, provider) for provider in dict.fromkeys(requested + MOBILE))


def heavy_operators(precision: str) -> dict[str, str]:
    """The operators that hold nearly all of a decoder's time in an edgeslim graph (known before it is built), and
    what they do."""
    matmul = f"{MS}:MatMulNBits" if precision == "int4" else "ai.onnx:MatMul"
    return {matmul: "matmuls", f"{MS}:GroupQueryAttention": "attention"}


def plan_notes(profile: DeviceProfile) -> tuple[str, ...]:
    """One line for each listed provider that cannot run the planned graph's matmuls or attention."""
    notes = []
    for provider in profile.execution_providers:
        missing = {op.split(":")[1]: role for op, role in heavy_operators(profile.precision).items()
                   if supported(provider, op) is False}
        if missing:
            notes.append(f"{provider} has no {' or '.join(missing)}: the {profile.precision} graph's "
                         f"{' and '.join(missing.values())} run on {CPU} on this device")
    return tuple(notes)
