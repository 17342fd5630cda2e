"""Basis selection for the vocabulary: keep the embedding and lm_head rows the target application uses.

The vocabulary table is weights too, and on small models the largest single matrix (SmolLM2-135M: 28M of its 135M
weights; a 150k-token vocabulary is most of a 0.5B model). A plan may keep only the rows of the tokens the target
application uses; every other token shares one *bucket* row:
- ranking: special tokens first, then the tokens of the task's calibration text by frequency, then the rest by id
  (a BPE vocabulary is ordered by merge, roughly by frequency in the tokenizer's own corpus);
- input side: a token outside the kept rows is embedded as the bucket row (the mean of the dropped rows);
- output side: the lm_head computes kept + 1 logits; each dropped token gets the bucket's logit minus log(number of
  dropped tokens), so the bucket's probability is spread evenly over them. Text outside the kept rows degrades
  gracefully (it can still be read and, rarely, written), nothing crashes, and the tokenizer and onnxruntime-genai
  are untouched: logits still cover the whole vocabulary (a Gather maps the kept logits back to token ids).
What it costs is measured, not estimated (`vocabulary_costs`): the loss on calibration text the ranking never saw,
with and without the pruning.
"""

from __future__ import annotations

import collections
import copy
import math

import torch
from torch import nn
from torch.nn import functional

from exporter.calibration import Calibration, calibration_batches

COUNTED_TOKENS = 400_000  # of calibration text, for the ranking
FRACTIONS = (0.75, 0.5, 0.33, 0.25)  # of the vocabulary a plan may keep
ROW_MULTIPLE = 256
EVAL_SAMPLES = 8  # windows of calibration text the ranking did not count, to measure the cost on


class PrunedEmbedding(nn.Module):
    """Embedding over kept rows + one bucket row; `index` maps every token id to its row."""

    def __init__(self, weight: nn.Parameter, index: torch.Tensor, scale: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.register_buffer("index", index)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = functional.embedding(self.index[input_ids], self.weight)
        return embedded if self.scale is None else embedded * self.scale.to(embedded.dtype)


class PrunedHead(nn.Module):
    """lm_head over kept rows + one bucket row, logits mapped back to the whole vocabulary."""

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.register_buffer("bias", bias)
        self.register_buffer("index", index)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.index.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return functional.linear(hidden, self.weight, self.bias).index_select(-1, self.index)


def token_ranking(tokenizer, texts: list[str], vocab_size: int) -> list[int]:
    """Every token id, in the order rows are kept: specials, then by frequency in `texts`, then by id."""
    counts: collections.Counter[int] = collections.Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False).input_ids)
        if sum(counts.values()) >= COUNTED_TOKENS:
            break
    specials = [i for i in tokenizer.all_special_ids if 0 <= i < vocab_size]
    seen = [i for i, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if i < vocab_size]
    return list(dict.fromkeys([*specials, *seen, *range(vocab_size)]))


def candidates(vocab_size: int) -> list[int]:
    """Kept-row counts a plan may choose (besides the whole vocabulary)."""
    return sorted({max(ROW_MULTIPLE, round(f * vocab_size / ROW_MULTIPLE) * ROW_MULTIPLE) for f in FRACTIONS},
                  reverse=True)


@torch.no_grad()
def prune_vocabulary_(model: nn.Module, kept: list[int]) -> nn.Module:
    """Mutates `model`: embedding and lm_head over the kept rows and one bucket row (tied ones stay tied)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab = embedding.weight.shape[0]
    keep = torch.tensor(sorted(kept))
    dropped = torch.ones(vocab, dtype=torch.bool)
    dropped[keep] = False
    index = torch.full((vocab,), len(keep), dtype=torch.long)
    index[keep] = torch.arange(len(keep))

    def rows(weight: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(torch.cat([weight[keep], weight[dropped].mean(0, keepdim=True)]))

    table = rows(embedding.weight)
    head_weight = table if head.weight is embedding.weight else rows(head.weight)
    bias = torch.zeros(len(keep) + 1)
    bias[-1] = -math.log(max(int(dropped.sum()), 1))  # the bucket's probability, spread over the dropped tokens
    if getattr(head, "bias", None) is not None:
        bias += torch.cat([head.bias[keep], head.bias[dropped].mean(0, keepdim=True)])
    model.set_input_embeddings(PrunedEmbedding(table, index, getattr(embedding, "embed_scale", None)))
    model.set_output_embeddings(PrunedHead(head_weight, bias, index))
    return model


def vocabulary_costs(model: nn.Module, tokenizer, texts: list[str], seed: int,
                     ranking: list[int]) -> dict[int, float]:
    """Loss increase per token of keeping each candidate count of rows, measured on calibration windows made of
    texts the ranking did not count (the odd-indexed ones; `texts[::2]` ranks)."""
    held = calibration_batches(tokenizer, texts[1::2], EVAL_SAMPLES, 256, seed)
    base = _loss(model, held)
    costs = {}
    for count in candidates(len(ranking)):
        pruned = prune_vocabulary_(copy.deepcopy(model), ranking[:count])
        costs[count] = max(_loss(pruned, held) - base, 0.0)
        del pruned
    return costs


@torch.no_grad()
def _loss(model: nn.Module, calibration: Calibration) -> float:
    return sum(float(model(input_ids=b, labels=b).loss) for b in calibration.batches) / len(calibration.batches)
