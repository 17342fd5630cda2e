"""Quality of a model on held-out data of the target application, measured the same way for every runtime.

Everything goes through a `Decoder` (exporter.generate), so the dense PyTorch model, the compressed PyTorch model
and the shipped ONNX graph in onnxruntime are scored by the same code on the same items:
- task metric (exporter.grading): exact match for GSM8K, pass@1 in the sandbox for MBPP/HumanEval, from one greedy
  completion per item;
- perplexity of each item's reference answer given its own prompt (loss on the answer tokens only, token-weighted
  over items); texts longer than `WINDOW` tokens (or the decoder's context) are scored in sliding windows, each
  token once, with at least half a window of context;
- against a reference model (the dense one): top-1 agreement and KL(reference || model) at the same positions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from exporter.contracts import Evaluation, ItemScore, ModelScores
from exporter.errors import UsageError
from exporter.generate import Decoder, OnnxDecoder, TorchDecoder, generate
from exporter.grading import EvalItem, EvalTask
from exporter.sandbox import network_isolation

WINDOW = 512
COMPLETION_CHARS = 2000  # kept per item in report.json


@dataclass(frozen=True)
class TextScores:
    perplexity: float
    top1_vs_reference: float | None
    kl_vs_reference: float | None


def windows(context: list[int], answer: list[int], window: int = WINDOW) -> list[tuple[list[int], list[int]]]:
    """(context, targets) pieces that score every answer token once within `window` tokens, at least half of them
    context."""
    if not context:  # the first token has nothing to be predicted from
        context, answer = answer[:1], answer[1:]
    if len(context) + len(answer) <= window:
        return [(context, answer)] if answer else []
    full, first, stride = context + answer, len(context), window // 2
    return [(full[max(0, start - (window - stride)) : start], full[start : start + stride])
            for start in range(first, len(full), stride)]


def score_texts(
    decoder: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    reference: Decoder | None = None,
) -> TextScores:
    """Perplexity of each answer given its prompt; top-1 agreement and KL against `reference` if given."""
    nll, same, kl, count = 0.0, 0, 0.0, 0
    window = min(WINDOW, *(d.max_length or WINDOW for d in (decoder, reference) if d is not None))
    for prompt, answer in pairs:
        context = tokenizer(prompt).input_ids if prompt else []
        answer_ids = tokenizer(answer, add_special_tokens=not prompt).input_ids
        for piece_context, targets in windows(context, answer_ids, window):
            log_probs = torch.log_softmax(torch.from_numpy(decoder.logits_for(piece_context, targets)).double(), -1)
            nll -= float(log_probs[torch.arange(len(targets)), torch.tensor(targets)].sum())
            count += len(targets)
            if reference is not None:
                ref = torch.log_softmax(torch.from_numpy(reference.logits_for(piece_context, targets)).double(), -1)
                same += int((ref.argmax(-1) == log_probs.argmax(-1)).sum())
                kl += float((ref.exp() * (ref - log_probs)).sum())
    count = max(count, 1)
    if reference is None:
        return TextScores(math.exp(nll / count), None, None)
    return TextScores(math.exp(nll / count), same / count, kl / count)


def answer_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> float:
    """Perplexity of a PyTorch model on (prompt, answer) pairs (the quality benchmark's measure)."""
    return score_texts(TorchDecoder(model), tokenizer, pairs).perplexity


@torch.no_grad()
def top1_agreement(model: PreTrainedModel, other: PreTrainedModel, prompts: list[torch.Tensor]) -> float:
    """Fraction of positions where both models predict the same next token."""
    same = sum(int((model(ids).logits.argmax(-1) == other(ids).logits.argmax(-1)).sum()) for ids in prompts)
    return same / sum(ids.numel() for ids in prompts)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, item: EvalItem) -> list[int]:
    """The item's chat messages through the tokenizer's chat template when both exist, else its text prompt."""
    if item.chat and tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(list(item.chat), add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(item.prompt).input_ids


def evaluate_model(
    decoder: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    task: EvalTask,
    items: list[EvalItem],
    max_new_tokens: int,
    reference: Decoder | None = None,
    advance: Callable[[], None] = lambda: None,
) -> ModelScores:
    """One model on every item: a greedy completion graded by the task, then the answers' perplexity."""
    start = time.perf_counter()
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    scores = []
    for item in items:
        if item.grade is None:
            scores.append(ItemScore(item.id, None, "perplexity only", "", 0))
        else:
            generation = generate(decoder, prompt_ids(tokenizer, item), max_new_tokens, tokenizer,
                                  task.stop_strings, eos)
            correct, detail = item.grade(generation.text)
            scores.append(ItemScore(item.id, correct, detail, generation.text[:COMPLETION_CHARS],
                                    len(generation.tokens)))
        advance()
    text = score_texts(decoder, tokenizer, [(item.context, item.answer) for item in items], reference)
    graded = [s.correct for s in scores if s.correct is not None]
    return ModelScores(
        label=decoder.label,
        metric=task.metric,
        score=sum(graded) / len(graded) if graded else None,
        perplexity=text.perplexity,
        top1_vs_reference=text.top1_vs_reference,
        kl_vs_reference=text.kl_vs_reference,
        seconds=round(time.perf_counter() - start, 1),
        items=tuple(scores),
    )


def evaluate(
    decoders: list[Decoder],
    tokenizer: PreTrainedTokenizerBase,
    task: EvalTask,
    items: list[EvalItem],
    seed: int,
    max_new_tokens: int,
    reference: Decoder | None = None,
    advance: Callable[[], None] = lambda: None,
) -> Evaluation:
    """Every decoder on the same items; the reference (if any) is scored too, and the others compared to it."""
    models = []
    if reference is not None:
        models.append(evaluate_model(reference, tokenizer, task, items, max_new_tokens, None, advance))
    for decoder in decoders:
        models.append(evaluate_model(decoder, tokenizer, task, items, max_new_tokens, reference, advance))
    return Evaluation(
        task=task.name,
        items=len(items),
        seed=seed,
        max_new_tokens=max_new_tokens,
        reference=None if reference is None else reference.label,
        sandbox_network=network_isolation() if task.metric == "pass@1" else None,
        models=tuple(models),
    )


def decoder_for_folder(folder: str | Path, threads: int | None = None) -> tuple[OnnxDecoder, PreTrainedTokenizerBase]:
    """The shipped graph of an export folder in onnxruntime (CPU), with the tokenizer exported beside it."""
    folder = Path(folder)
    model_file = folder / "model.onnx"
    if not model_file.is_file():
        raise UsageError(f"{folder}: no model.onnx here; pass a folder written by `edgeslim export`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise UsageError(f"{folder}: cannot load the tokenizer beside model.onnx ({reason})") from None
    threads = threads or os.cpu_count() or 1
    return OnnxDecoder.from_file(model_file, "CPUExecutionProvider", threads, f"{folder.name} (onnxruntime)"), tokenizer
