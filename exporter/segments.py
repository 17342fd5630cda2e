"""Running an all-positions graph a few blocks at a time, so validating a model holds a few of its blocks in
onnxruntime, not the whole model.

A session holds all of a graph's weights, prepacked (about 1.4x the int4 data file): scoring a 7B model's graphs
whole held 4-5 GB beside the exporter, whatever the export itself needed. Here the graph is cut where its blocks
begin (`graph.stage_starts`) into segments of about `SEGMENT_BYTES` of stored weights each, and the head (final
norm to logits). A segment reads its weights from the graph's own data file (nothing is copied), runs once over
every sequence and passes on what later segments read (the residual stream, the lengths made from the mask); one
segment is in memory at a time. The head works position by position, so it runs `HEAD_ROWS` positions at a time
(a 512-token window's logits at a 150k vocabulary are 0.3 GB). Every node computes what it computes in the whole
graph, on the same inputs: the logits are the whole graph's (`tests/test_graph.py` compares them).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from exporter.graph import FINAL_NORM, stage_starts
from exporter.measure import feed, session

SEGMENT_BYTES = 256 * 2**20
HEAD_ROWS = 128
LOGITS = "logits"


def stored_bytes(initializer: onnx.TensorProto) -> int:
    """The bytes a weight takes in its file (external data's recorded length, or the bytes inside the graph)."""
    length = next((entry.value for entry in initializer.external_data if entry.key == "length"), None)
    return int(length) if length is not None else initializer.ByteSize()


def segment_ranges(graph: onnx.ModelProto, max_bytes: int = SEGMENT_BYTES) -> list[tuple[int, int]]:
    """[start, end) node ranges: consecutive blocks up to `max_bytes` of weights (at least one block; the nodes
    before the first block join the first segment), then the head alone."""
    nodes, starts = graph.graph.node, stage_starts(graph)
    if not starts or nodes[starts[-1]].name != FINAL_NORM:
        raise ValueError(f"{graph.graph.name}: no '{FINAL_NORM}' node; not an edgeslim decoder graph")
    sizes = {init.name: stored_bytes(init) for init in graph.graph.initializer}
    bounds, held = [0], 0
    for start, end in pairwise(starts):
        block = sum(sizes[name] for name in {i for node in nodes[start:end] for i in node.input if i in sizes})
        if held and held + block > max_bytes:
            bounds.append(start)
            held = 0
        held += block
    bounds += [starts[-1], len(nodes)]
    return list(pairwise(bounds))


def element_types(graph: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type, followed through the nodes (a segment's outputs must be declared with theirs,
    and onnx's own inference does not know onnxruntime's operators): a Cast's is its target, a Shape's int64, a
    quantized gather's its scales', any other node's its first input's."""
    types = {value.name: value.type.tensor_type.elem_type for value in graph.graph.input}
    types |= {init.name: init.data_type for init in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Cast":
            made = next(attribute.i for attribute in node.attribute if attribute.name == "to")
        elif node.op_type == "Shape":
            made = onnx.TensorProto.INT64
        else:
            made = types[node.input[2 if node.op_type == "GatherBlockQuantized" else 0]]
        types |= {name: made for name in node.output if name}
    return types


class SegmentedGraph:
    """An all-positions graph (exporter.graph.all_positions) run segment by segment over many sequences, each
    with an empty KV cache."""

    def __init__(self, graph_file: str, provider: str, threads: int, max_bytes: int = SEGMENT_BYTES):
        self.folder = str(Path(graph_file).resolve().parent)
        self.graph = onnx.load(graph_file, load_external_data=False)
        self.provider, self.threads = provider, threads
        self.ranges = segment_ranges(self.graph, max_bytes)
        self.types = element_types(self.graph)
        self.fell_back = False  # a session onnxruntime silently ran on another provider
        self.empty_past = {}  # past_key_values.N.key|value, no positions: (batch, kv heads, 0, head dim)
        for value in self.graph.graph.input[2:]:
            dims = value.type.tensor_type.shape.dim
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            self.empty_past[value.name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), dtype=dtype)

    def logits(self, sequences: list[list[int]]) -> Iterator[tuple[int, int, np.ndarray]]:
        """(sequence index, first position, logits (positions, vocab)) for every position of every sequence,
        `HEAD_ROWS` positions at a time, in order."""
        if not sequences:
            return
        # per sequence, what the segments still to run read: first the graph's own inputs
        carried = [feed(np.array([ids], dtype=np.int64), self.empty_past, 0) for ids in sequences]
        for start, end in self.ranges[:-1]:
            later = self._read_from(end)
            sess = self._session(start, end, later)
            wanted = [output.name for output in sess.get_outputs()]
            for index, held in enumerate(carried):
                outputs = sess.run(wanted, {i.name: held[i.name] for i in sess.get_inputs()})
                made = {name: value.copy() for name, value in zip(wanted, outputs, strict=True)}  # not views: they
                # would keep the session's memory after it is gone
                carried[index] = {name: value for name, value in {**held, **made}.items() if name in later}
            del sess
        head = self._session(*self.ranges[-1], set())
        for index, ids in enumerate(sequences):
            for first in range(0, len(ids), HEAD_ROWS):  # (batch, positions, hidden) inputs, a slice of positions
                feeds = {i.name: carried[index][i.name][:, first:first + HEAD_ROWS] for i in head.get_inputs()}
                yield index, first, head.run([LOGITS], feeds)[0][0]
            carried[index] = {}

    def _read_from(self, start: int) -> set[str]:
        """The tensors nodes from `start` on read."""
        return {name for node in self.graph.graph.node[start:] for name in node.input if name}

    def _session(self, start: int, end: int, later: set[str]) -> ort.InferenceSession:
        """A session of nodes [start, end): its inputs what they read from before, its outputs what `later`
        nodes read (or the logits)."""
        graph, nodes = self.graph.graph, self.graph.graph.node[start:end]
        made = {name for node in nodes for name in node.output if name}
        later = later | {LOGITS}
        initializers = {init.name: init for init in graph.initializer}
        read = [name for name in dict.fromkeys(i for node in nodes for i in node.input if i) if name not in made]
        inputs = [helper.make_tensor_value_info(name, self.types[name], None) for name in read
                  if name not in initializers]
        outputs = [helper.make_tensor_value_info(name, self.types[name], None)
                   for node in nodes for name in node.output if name in later]
        part = helper.make_graph(list(nodes), f"{graph.name}[{start}:{end}]", inputs, outputs,
                                 [initializers[name] for name in read if name in initializers])
        proto = helper.make_model(part, opset_imports=self.graph.opset_import, ir_version=self.graph.ir_version)
        sess = session(proto.SerializeToString(), self.provider, self.threads, data_folder=self.folder, arena=False)
        self.fell_back |= sess.get_providers()[0] != self.provider
        return sess
