"""Quality of what ships, measured on every export: held-out text of the target task through the shipped graph.

The shipped graph (its all-positions twin, exporter.export) and the dense model at the same precision score the
same held-out tokens in onnxruntime: the first `HELDOUT_TOKENS` tokens of the task's held-out split (never its
calibration split), prompts and answers joined by the end-of-sequence token, in windows of `WINDOW` tokens. The
reference is what a user gets from the same checkpoint with no compression at all: every weight rounded to
nearest at the same precision (exactly as onnxruntime's quantizer and onnxruntime-genai's builder round), the
same graph structure and runtime. Reported: both perplexities and their ratio, and the shipped model's next-token
agreement with the reference and KL(reference || shipped) per token; the dense fp32 model's perplexity beside
them (PyTorch). The ratio is gated: above the profile's `quality.max_ppl_ratio` the export fails.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from exporter.contracts import ModelSpec, Quality
from exporter.export import save_variant, write_decoder
from exporter.graph import GraphOptions, all_positions
from exporter.measure import feed, kv_layout
from exporter.quantize import quantize_model
from exporter.segments import SegmentedGraph
from exporter.tasks import Task

HELDOUT_TOKENS = 2048
WINDOW = 512
ROWS = 64  # positions whose log-probabilities are held at once
CHUNK = 128  # positions an all-positions graph is run on at once


def heldout_tokens(task: Task, tokenizer: PreTrainedTokenizerBase, root: Path,
                   count: int = HELDOUT_TOKENS) -> list[int]:
    """The first `count` tokens of the task's held-out texts (prompt + reference answer), EOS between texts."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for prompt, answer in task.heldout(root):
        ids += tokenizer(prompt + answer, add_special_tokens=False).input_ids + separator
        if len(ids) >= count:
            break
    return ids[:count]


@dataclass
class _Scores:
    nll: float = 0.0
    reference_nll: float = 0.0
    same: int = 0
    kl: float = 0.0
    count: int = 0


def reference_graph(dense: PreTrainedModel, spec: ModelSpec, precision: str, activations: str, kv_cache: str,
                    window: int, folder: Path) -> Path:
    """The uncompressed model at `precision` (int4: every weight rounded to nearest, computing with the shipped
    graph's `activations`), all positions' logits."""
    folder.mkdir(parents=True, exist_ok=True)
    quantized = None if precision == "fp32" else quantize_model(dense)
    graph = write_decoder(folder / "weights.onnx", dense, spec, GraphOptions(window, activations, kv_cache), quantized)
    save_variant(all_positions(graph), folder / "all-positions.onnx")
    return folder / "all-positions.onnx"


def measure_quality(
    task: str,
    ids: list[int],
    shipped_file: str,
    reference_file: str,
    dense_nll: float,
    threads: int,
    max_ratio: float,
    window: int = WINDOW,
) -> Quality:
    """Score `ids` with both graphs (windows of `window` tokens, each token predicted from its window's earlier
    tokens); `dense_nll` is the dense fp32 model's summed negative log-likelihood of the same tokens
    (`torch_nll`, or a streamed export's own).

    Each graph runs a few blocks at a time (exporter.segments: one segment in memory at a time, whatever the
    model's depth), and the two one after the other: the reference's log-probabilities wait in a temporary file
    (float32; 1.2 GB at 2048 tokens of a 150k vocabulary) until the shipped graph's are compared with them."""
    scores, windows = _Scores(), heldout_windows(ids, window)
    with tempfile.TemporaryFile() as kept:
        for logits, targets in _scored(reference_file, windows, threads):
            for rows, log_r in log_softmax_rows(logits):
                scores.reference_nll -= float(log_r[np.arange(len(targets[rows])), targets[rows]].sum())
                kept.write(log_r.astype(np.float32).tobytes())
        kept.seek(0)
        for logits, targets in _scored(shipped_file, windows, threads):
            for rows, log_p in log_softmax_rows(logits):
                log_r = np.frombuffer(kept.read(log_p.size * 4), dtype=np.float32).reshape(log_p.shape)
                scores.nll -= float(log_p[np.arange(len(targets[rows])), targets[rows]].sum())
                scores.same += int((log_p.argmax(-1) == log_r.argmax(-1)).sum())
                scores.kl += float((np.exp(log_r, dtype=np.float64) * (log_r - log_p)).sum())
            scores.count += len(targets)
    count = max(scores.count, 1)
    perplexity, reference_perplexity = math.exp(scores.nll / count), math.exp(scores.reference_nll / count)
    ratio = perplexity / reference_perplexity
    return Quality(
        task=task, tokens=count, window=window, shipped_perplexity=round(perplexity, 4),
        reference_perplexity=round(reference_perplexity, 4),
        dense_fp32_perplexity=round(math.exp(dense_nll / count), 4), ratio=round(ratio, 4),
        top1_vs_reference=round(scores.same / count, 4), kl_vs_reference=round(scores.kl / count, 5),
        max_ratio=max_ratio, passed=ratio <= max_ratio,
    )


def _scored(graph_file: str, windows: list[list[int]], threads: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(logits, the tokens they predict) for every position of each window but its last, a few at a time."""
    graph = SegmentedGraph(graph_file, "CPUExecutionProvider", threads)
    for index, first, logits in graph.logits(windows):
        targets = np.array(windows[index][first + 1:first + len(logits) + 1])
        yield logits[:len(targets)], targets


def heldout_windows(ids: list[int], window: int) -> list[list[int]]:
    """The pieces `ids` is scored in: consecutive windows of `window` tokens (at least 2: one to predict)."""
    return [piece for start in range(0, len(ids) - 1, window) if len(piece := ids[start:start + window]) >= 2]


@torch.no_grad()
def torch_nll(model: PreTrainedModel, ids: list[int], window: int) -> float:
    """Summed negative log-likelihood of `ids` under `model` (PyTorch), scored in the windows the graphs are."""
    total = 0.0
    for piece in heldout_windows(ids, window):
        logits = model(input_ids=torch.tensor([piece])).logits[0, :-1].numpy()
        targets = np.array(piece[1:])
        for rows, log_p in log_softmax_rows(logits):
            total -= float(log_p[np.arange(len(targets[rows])), targets[rows]].sum())
    return total


def window_logits(sess: ort.InferenceSession, ids: list[int], window: int,
                  head_dim: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first position, logits (positions, vocab), the tokens they predict) for every position of `ids` but each
    window's last, from a graph that returns every position's logits (`head_dim` for graphs that leave it
    symbolic). Each token is predicted from its window's earlier tokens; a window runs `CHUNK` positions at a time
    through the KV cache (the same logits, bit for bit: a 512-position window's at a 150k-token vocabulary would be
    0.3 GB)."""
    layout = kv_layout(sess, head_dim)
    presents = [output.name for output in sess.get_outputs()][1:]
    for start, piece in zip(range(0, len(ids), window), heldout_windows(ids, window), strict=False):
        past, seen = layout.empty(), 0
        for first in range(0, len(piece) - 1, CHUNK):
            chunk = np.array([piece[first:first + CHUNK]], dtype=np.int64)
            logits, *present = sess.run(None, feed(chunk, past, seen))
            past = {name.replace("present.", "past_key_values.", 1): value
                    for name, value in zip(presents, present, strict=True)}
            seen += chunk.shape[1]
            targets = np.array(piece[first + 1:first + CHUNK + 1])
            yield start + first, logits[0, :len(targets)], targets


def log_softmax_rows(logits: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Float64 log-probabilities of `logits`, `ROWS` positions at a time: a whole window at once would be 0.6 GB
    per array at a 150k-token vocabulary (Qwen2, Llama 3), several times over."""
    for first in range(0, len(logits), ROWS):
        block = logits[first:first + ROWS].astype(np.float64)
        block -= block.max(-1, keepdims=True)
        yield slice(first, first + ROWS), block - np.log(np.exp(block).sum(-1, keepdims=True))
