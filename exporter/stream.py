"""Layer streaming: compress and export a checkpoint one decoder block at a time, so the export's memory is bounded
by a block, the calibration activations and the vocabulary table, not by the model (README, "Scale").

As SVD-LLM and SliceGPT do on small GPUs, the inputs of block i are the outputs of block i-1, carried from block to
block as hidden states. One pass over the checkpoint (exporter.checkpoint reads each block's tensors, then drops
them) does, per block:
1. run the dense block on every stream: the calibration windows (hooks collect its projections' input Gram
   matrices: exactly the statistics the in-memory path collects on the whole model), the held-out windows (the
   dense fp32 perplexity) and the parity prompts;
2. add the block, rounded to nearest, to the quality reference graph (the uncompressed model at the shipped
   precision, what quality is judged against);
3. select bases and factorize the layers the plan factorizes, round with GPTQ, add the block to the shipped graph
   (its weights go straight into the data file) and run the prompts' mirror stream through the rounded block:
   the PyTorch twin the shipped graph's logits are proven against. A method that learns from the block itself
   (`collect_block`: basel-layerwise relearns the block's bases to reproduce its dense outputs) does so before 3.
The embedding, final norm and lm_head are loaded before the blocks and after them only. The lm_head is rounded by
GPTQ on the final hidden states: last when untied; a table tied to the embedding is needed before block 0, so at
int4 a dense pass over the blocks on the calibration windows comes first, for its final states.

Parity is teacher-forced (every position of each prompt in one pass), since greedy generation would take one pass
over the checkpoint per token. Layer sensitivity is priced a block at a time before this pass
(exporter.sensitivity.streamed_costs). What needs the whole model at once is not done here: relearning through the
whole model (basel), vocabulary pruning and `--eval`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from exporter.calibration import Calibration
from exporter.checkpoint import Checkpoint, release
from exporter.collect import InputStats, grams_on_disk
from exporter.contracts import LayerPlan, LayerResult, ModelSpec, OnnxArtifact, RankPlan, Spectrum
from exporter.datafile import DataFile
from exporter.export import ALL_POSITIONS_FILE, EXACT_FILE, MODEL_FILE, artifact_for, save_variant, write_runtime_files
from exporter.factorize import factorize_, layer_spectrum, spectrum_layers
from exporter.graph import DecoderGraph, GraphOptions, all_positions
from exporter.models import lm_head_name
from exporter.quality import ROWS, heldout_windows
from exporter.quantize import Int4Matrix, apply_, quantize_modules, round_to_nearest, untied_embedding
from exporter.select import SelectionMethod, single_thread


@dataclass
class Piece:
    """One sequence on its way through the blocks: its hidden states and what the model passes every block for it
    (attention mask, positions, rotary cos/sin)."""

    hidden: torch.Tensor
    kwargs: dict


@dataclass
class Windows:
    """The calibration windows on their way through the blocks. `dense`: through the dense blocks, what the
    statistics and the relearning targets come from. `compressed` (only for a method that relearns blocks): through
    the blocks as compressed so far, what a compressed block will receive, so relearning block i on these inputs
    against the dense targets also makes up for the error of the blocks before it."""

    dense: list[Piece]
    compressed: list[Piece] | None


@dataclass
class Streamed:
    """What one streamed pass made: the export, and the references its validation compares with."""

    artifact: OnnxArtifact
    layers: tuple[LayerResult, ...]
    spectra: tuple[Spectrum, ...]
    compressed_logits: list[np.ndarray]  # every position of each prompt: the compressed model in fp32 (PyTorch)
    mirror_logits: list[np.ndarray]  # the same through the PyTorch twin of the shipped weights
    dense_nll: float  # summed over the held-out tokens quality scores, dense fp32 model
    reference_file: Path  # the quality reference graph, all positions


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first block: keeps what the model hands it and stops the forward there."""

    def __init__(self, block: nn.Module, sink: list[Piece]):
        super().__init__()
        self.sink = sink
        self.attention_type = getattr(block, "attention_type", "full_attention")  # Qwen2 picks its mask by this

    def forward(self, hidden: torch.Tensor, **kwargs) -> None:
        self.sink.append(Piece(hidden, kwargs))
        raise _Captured


@torch.no_grad()
def embed(model: PreTrainedModel, blocks_path: str, sequences: list[torch.Tensor]) -> list[Piece]:
    """Each sequence (1, length) as the first block receives it."""
    blocks = model.get_submodule(blocks_path)
    first, pieces = blocks[0], []
    blocks[0] = _Catcher(first, pieces)
    try:
        for ids in sequences:
            with suppress(_Captured):
                model(input_ids=ids, use_cache=False)
    finally:
        blocks[0] = first
    return pieces


@torch.no_grad()
def through(block: nn.Module, pieces: list[Piece]) -> list[Piece]:
    outputs = []
    for piece in pieces:
        out = block(piece.hidden, **piece.kwargs)
        outputs.append(Piece(out[0] if isinstance(out, tuple) else out, piece.kwargs))
    return outputs


class Head:
    """Final norm and lm_head on hidden states, `ROWS` positions at a time (a window's logits at a 150k-token
    vocabulary would be 0.3 GB)."""

    def __init__(self, model: PreTrainedModel, final_norm: str):
        self.norm, self.head = model.get_submodule(final_norm), model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.head(self.norm(hidden))
        return out if not self.softcap else torch.tanh(out / self.softcap) * self.softcap

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self(hidden)

    def loss_gradient(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The gradient of a window's summed next-token losses (`ids`, (1, length)) with respect to its final
        hidden states `hidden` (1, length, width); the logits' gradient is as large as they are."""
        hidden = hidden.detach().requires_grad_()
        targets = ids[:, 1:]
        with torch.enable_grad():
            for first in range(0, targets.shape[1], ROWS):
                chunk = targets[:, first:first + ROWS]
                logits = self(hidden[:, first:first + chunk.shape[1]])
                nn.functional.cross_entropy(logits.flatten(0, 1).float(), chunk.flatten(), reduction="sum").backward()
        return hidden.grad

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> float:
        """Summed negative log-likelihood of `targets` (one per position of `hidden`, (positions, width))."""
        total = 0.0
        for first in range(0, len(targets), ROWS):
            log_p = torch.log_softmax(self.logits(hidden[first:first + ROWS]).double(), -1)
            total -= float(log_p.gather(1, targets[first:first + ROWS, None]).sum())
        return total


@dataclass
class StreamInputs:
    """The data one streamed pass runs: calibration windows, held-out token ids, parity prompts."""

    calibration: Calibration
    heldout: list[int]
    window: int  # held-out scoring window, as exporter.quality scores
    prompts: list[torch.Tensor]


def stream_export(checkpoint: Checkpoint, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  spec: ModelSpec, options: GraphOptions, precision: str, plan: RankPlan, method: SelectionMethod,
                  inputs: StreamInputs, folder: Path, on_block: Callable[[], None] = lambda: None) -> Streamed:
    """The export (graph, tokenizer and runtime files in `folder`) of `checkpoint` compressed by `plan`, a block
    at a time; `model` is its skeleton (exporter.checkpoint: weights on the meta device).

    At int4 the vocabulary tables are rounded before the blocks, since the twin's prompts enter the blocks through
    the shipped embedding: an untied embedding to nearest (a lookup), a tied table by GPTQ on the dense model's
    final hidden states, as the in-memory path rounds it, which costs one more dense pass over the blocks on the
    calibration windows first. An untied lm_head is rounded by GPTQ at the end."""
    arch, head = checkpoint.arch, Head(model, checkpoint.arch.final_norm)
    int4 = precision == "int4"
    head_name = lm_head_name(model)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    windows = heldout_windows(inputs.heldout, inputs.window)
    with checkpoint.outside_blocks(model):  # the vocabulary tables, loaded before the blocks and after them only
        calibration = _windows(model, arch.blocks, inputs.calibration, method)
        heldout = embed(model, arch.blocks, [torch.tensor([piece]) for piece in windows])
        compressed = embed(model, arch.blocks, inputs.prompts)  # the compressed model in fp32: the twin's reference
        output = model.get_output_embeddings()
        nearest_table = {head_name: round_to_nearest(output.weight.detach())} if int4 and tied else {}
        table = nearest_table if tied else untied_embedding(model) if int4 else {}
    if int4 and tied:  # GPTQ needs the final hidden states: one dense pass over the blocks gives them first
        final = carry(checkpoint, model, spec, Windows(calibration.dense, None))
        with checkpoint.outside_blocks(model):
            table = quantize_modules(model.get_output_embeddings(), _head_stats(head, head_name, final), head_name)
    with checkpoint.outside_blocks(model), _rounded(model, checkpoint, table):
        mirror = embed(model, arch.blocks, inputs.prompts)  # the PyTorch twin of the shipped weights
    picked = spectrum_layers(plan)
    layers, spectra = [], []
    (folder / "quality-reference").mkdir()
    reference_path = folder / "quality-reference" / "weights.onnx"
    exact = precision != "fp32" or options.kv_cache != "fp32"  # a twin computing in fp32 throughout (export.py)
    with ExitStack() as files:
        shipped = DecoderGraph(model, spec, options, files.enter_context(DataFile(folder / f"{MODEL_FILE}.data")))
        reference = DecoderGraph(model, spec, GraphOptions(inputs.window, options.activations, options.kv_cache),
                                 files.enter_context(DataFile(reference_path.with_name("weights.onnx.data"))))
        graphs = [shipped]
        if exact:
            graphs.append(DecoderGraph(model, spec, GraphOptions(options.context_length),
                                       files.enter_context(DataFile(folder / f"{EXACT_FILE}.data"))))
        for index in range(spec.num_layers):
            prefix = checkpoint.block_path(index)
            block, grams, selection = _calibrate(checkpoint, model, spec, index, calibration, plan, method)
            heldout = through(block, heldout)
            reference.add_block(index, quantize_modules(block, None, prefix) if int4 else None)

            with single_thread():
                spectra += [layer_spectrum(layer, model, method, selection) for layer in _factorized(plan, prefix)
                            if layer in picked]
                layers += _factorize(model, block, prefix, plan, method, selection, calibration)
            compressed = through(block, compressed)
            _round_into(graphs, model, block, index, grams if int4 else None, prefix)
            mirror = through(block, mirror)
            release(block)
            on_block()
        files.enter_context(checkpoint.outside_blocks(model))  # dropped before the data files close
        dense_nll = sum(head.nll(piece.hidden[0, :-1], torch.tensor(window[1:]))
                        for piece, window in zip(heldout, windows, strict=True))
        compressed_logits = [head.logits(piece.hidden[0]).numpy() for piece in compressed]
        nearest = rounded = None  # the lm_head: to nearest for the reference, by GPTQ on the final states to ship
        if int4 and tied:
            nearest, rounded = nearest_table, table
        elif int4:
            output = model.get_output_embeddings()
            nearest = {**quantize_modules(output, None, head_name), **table}
            rounded = {**quantize_modules(output, _head_stats(head, head_name, calibration.dense), head_name),
                       **table}
        reference_proto = reference.finish(nearest)
        shipped_proto, *exact_proto = (graph.finish(rounded) for graph in graphs)
        apply_(model, rounded or {})  # the tables are dropped after this
        mirror_logits = [head.logits(piece.hidden[0]).numpy() for piece in mirror]
    return Streamed(
        artifact=_save(shipped_proto, exact_proto, reference_proto, reference_path, folder, precision, options,
                       tokenizer, model, spec),
        layers=tuple(layers), spectra=tuple(spectra), compressed_logits=compressed_logits,
        mirror_logits=mirror_logits, dense_nll=dense_nll, reference_file=reference_path.with_name(ALL_POSITIONS_FILE),
    )


def _windows(model: PreTrainedModel, blocks_path: str, calibration: Calibration, method: SelectionMethod
             ) -> Windows:
    """The calibration windows as the first block receives them."""
    pieces = embed(model, blocks_path, list(calibration.batches))
    return Windows(pieces, list(pieces) if method.needs == "blocks" else None)


def _calibrate(checkpoint: Checkpoint, model: PreTrainedModel, spec: ModelSpec, index: int, windows: Windows,
               plan: RankPlan, method: SelectionMethod) -> tuple[nn.Module, dict, dict]:
    """Block `index` read from the checkpoint and run densely on the calibration windows (`windows.dense` moves
    on to its outputs): the block, its projections' input statistics (what GPTQ rounds by; their Gram matrices
    on disk until a layer reads one) and the method's statistics for the layers the plan factorizes in it
    (`collect_block`: the same statistics, or relearned weights)."""
    prefix = checkpoint.block_path(index)
    block = checkpoint.materialize(model.get_submodule(prefix), prefix)
    names = [layer.name for layer in spec.layers if layer.name.startswith(prefix + ".")]
    stats = InputStats()
    with stats.watching(model, names):
        outputs = through(block, windows.dense)
    grams = grams_on_disk(stats.result())
    ranks = {layer.name: layer.rank for layer in _factorized(plan, prefix)}
    selection = grams
    if ranks:
        selection = method.collect_block(model, block, windows.compressed or windows.dense, outputs, grams, ranks)
    windows.dense = outputs
    return block, grams, selection


def _round_into(graphs: list[DecoderGraph], model: PreTrainedModel, block: nn.Module, index: int,
                grams: dict | None, prefix: str) -> None:
    """Block `index` added to every graph: its layers rounded by GPTQ on `grams` (each Gram matrix freed once
    used) and written back into `model` as the runtime will compute them (the twin), or in fp32 without `grams`.
    The int4 matrices are freed on return, before the next block is read."""
    quantized = quantize_modules(block, grams, prefix, consume=True) if grams is not None else None
    for graph in graphs:
        graph.add_block(index, quantized)
    if quantized:
        apply_(model, quantized)


def _factorized(plan: RankPlan, prefix: str) -> list[LayerPlan]:
    return [layer for layer in plan.factorized if layer.name.startswith(prefix + ".")]


def _factorize(model: PreTrainedModel, block: nn.Module, prefix: str, plan: RankPlan, method: SelectionMethod,
               selection: dict, windows: Windows) -> tuple[LayerResult, ...]:
    """The block's planned layers factorized by `method`; the compressed windows, if carried, moved on through it."""
    layers = factorize_(model, replace(plan, layers=tuple(_factorized(plan, prefix))), method, selection)
    if windows.compressed is not None:
        windows.compressed = through(block, windows.compressed)
    return layers


def _head_stats(head: Head, head_name: str, final: list[Piece]) -> dict:
    """The lm_head's input statistics on the calibration windows' final hidden states (what GPTQ rounds it by)."""
    stats = InputStats()
    for piece in final:
        stats.accumulate(head_name, head.norm(piece.hidden))
    return stats.result()


def carry(checkpoint: Checkpoint, model: PreTrainedModel, spec: ModelSpec, windows: Windows,
          plan: RankPlan | None = None, method: SelectionMethod | None = None,
          on_block: Callable[[], None] = lambda: None) -> list[Piece]:
    """The calibration windows carried through every dense block: their final hidden states. With a plan and a
    method, each block's statistics are collected on the way, the method's `collect_block` runs and the block is
    factorized (a secondary process's share of the relearning, in step with the main process)."""
    for index in range(spec.num_layers):
        prefix = checkpoint.block_path(index)
        if method is None:
            block = checkpoint.materialize(model.get_submodule(prefix), prefix)
            windows.dense = through(block, windows.dense)
        else:
            block, _, selection = _calibrate(checkpoint, model, spec, index, windows, plan, method)
            _factorize(model, block, prefix, plan, method, selection, windows)
        release(block)
        on_block()
    return windows.dense


def relearn_share(checkpoint: Checkpoint, model: PreTrainedModel, spec: ModelSpec, plan: RankPlan,
                  method: SelectionMethod, calibration: Calibration, on_block: Callable[[], None] = lambda: None
                  ) -> None:
    """What a secondary process of a multi-process launch does: the same pass over the checkpoint's blocks on the
    same calibration stream, taking its share of each block's relearning (`collect_block`, data-parallel), while
    the main process also exports. Every process runs every calibration window through the dense blocks, so the
    statistics are whole in each without exchanging them; only the training is split."""
    with checkpoint.outside_blocks(model):
        windows = _windows(model, checkpoint.arch.blocks, calibration, method)
    carry(checkpoint, model, spec, windows, plan, method, on_block)


@contextmanager
def _rounded(model: PreTrainedModel, checkpoint: Checkpoint, tables: dict[str, Int4Matrix]) -> Iterator[None]:
    """`model` with these vocabulary tables rounded for a while, then read again from the checkpoint (the dense
    streams need them dense; a copy would cost a table's memory)."""
    apply_(model, tables)
    try:
        yield
    finally:
        for name in tables:
            checkpoint.reload(model, model.get_submodule(name).weight)


def _save(shipped: onnx.ModelProto, exact: list[onnx.ModelProto], reference: onnx.ModelProto, reference_path: Path,
          folder: Path, precision: str, options: GraphOptions, tokenizer: PreTrainedTokenizerBase,
          model: PreTrainedModel, spec: ModelSpec) -> OnnxArtifact:
    """The graphs (their weights are already in their data files), the all-positions twins validation reads,
    and the runtime files."""
    onnx.save_model(reference, str(reference_path))
    save_variant(all_positions(reference), reference_path.with_name(ALL_POSITIONS_FILE))
    model_file = folder / MODEL_FILE
    onnx.save_model(shipped, str(model_file))
    save_variant(all_positions(shipped), folder / ALL_POSITIONS_FILE)
    exact_file = folder / ALL_POSITIONS_FILE
    if exact:  # its weights file is EXACT_FILE.data: the all-positions twin is saved under that name
        exact_file = folder / EXACT_FILE
        save_variant(all_positions(exact[0]), exact_file)
    write_runtime_files(folder, tokenizer, model, spec, options.context_length)
    return artifact_for(shipped, model_file, model_file, exact_file, folder / ALL_POSITIONS_FILE, precision)
