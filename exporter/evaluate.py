"""Quality metrics of a (compressed) PyTorch model on held-out text of the target application.

Perplexity here is of the reference answer given its prompt (loss only on the answer's tokens, token-weighted
over all items), so it measures the application, not the prompt format. Top-1 agreement compares next-token
predictions of two models at every position.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_ITEM_TOKENS = 512


@torch.no_grad()
def answer_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> float:
    """exp(mean negative log-likelihood of each answer's tokens given its prompt), token-weighted."""
    total, count = 0.0, 0
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt).input_ids if prompt else []
        answer_ids = tokenizer(answer, add_special_tokens=not prompt).input_ids
        ids = torch.tensor([(prompt_ids + answer_ids)[:MAX_ITEM_TOKENS]])
        labels = ids.clone()
        labels[:, : len(prompt_ids)] = -100  # no loss on the prompt
        if (labels[:, 1:] != -100).sum() == 0:
            continue
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels[:, 1:], ignore_index=-100,
                                                reduction="sum")
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def top1_agreement(model: PreTrainedModel, other: PreTrainedModel, prompts: list[torch.Tensor]) -> float:
    """Fraction of positions where both models predict the same next token."""
    same = sum(int((model(ids).logits.argmax(-1) == other(ids).logits.argmax(-1)).sum()) for ids in prompts)
    return same / sum(ids.numel() for ids in prompts)
