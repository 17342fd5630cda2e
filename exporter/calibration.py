"""Calibration batches: the target application's text as fixed-length token windows, with a fingerprint.

The fingerprint (a hash of the token ids) is part of every data-dependent cache key, so switching tasks, sample
counts or seeds can never reuse statistics collected on other data.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from exporter.errors import UsageError

MAX_SAMPLES = 4096
MAX_SEQ_LEN = 8192


@dataclass(frozen=True)
class Calibration:
    batches: tuple[torch.Tensor, ...]  # each (1, seq_len) token ids
    fingerprint: str

    @property
    def tokens(self) -> int:
        return sum(batch.numel() for batch in self.batches)


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], samples: int, seq_len: int, seed: int
) -> Calibration:
    """`samples` windows of `seq_len` tokens from the texts, shuffled reproducibly and joined by EOS."""
    if not 0 < samples <= MAX_SAMPLES:
        raise UsageError(f"--calibration-samples {samples}: must be between 1 and {MAX_SAMPLES}")
    if not 8 <= seq_len <= MAX_SEQ_LEN:
        raise UsageError(f"--calibration-seq-len {seq_len}: must be between 8 and {MAX_SEQ_LEN}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed, ids = samples * seq_len, []
    for index in order:
        ids += tokenizer(texts[index], add_special_tokens=False).input_ids + separator
        if len(ids) >= needed:
            break
    if len(ids) < seq_len:
        raise UsageError(
            f"calibration data too small: {len(ids)} tokens, need at least {seq_len} (one window); "
            "use a larger data set or a shorter --calibration-seq-len"
        )
    windows = min(samples, len(ids) // seq_len)
    tokens = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, 1, seq_len)
    fingerprint = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    return Calibration(batches=tuple(tokens), fingerprint=fingerprint)
