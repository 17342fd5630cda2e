"""Token-by-token decoding with a KV cache, the same way through onnxruntime and through PyTorch.

A `Decoder` has two calls: `start(prompt ids)` returns the next-token logits after the prompt, `step(token)` feeds
one more token and returns the logits after it. Everything else is written once on top of that: greedy
generation with stop strings and a token limit (`generate`), and teacher-forced logits (`logits_for`) for
perplexity and for comparing two models position by position. Because the ONNX graph returns last-position logits
only, as on-device runtimes use it, scoring through onnxruntime goes one token at a time; PyTorch does it in one
forward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from exporter.graph import CONTEXT_KEY
from exporter.measure import feed, kv_layout, session


class Decoder(ABC):
    label: str
    max_length: int | None = None  # the longest sequence it serves (an exported graph's context), None: no limit

    @abstractmethod
    def start(self, ids: list[int]) -> np.ndarray:
        """Forget any earlier sequence, run the prompt, return the next-token logits (vocab,) as float32."""

    @abstractmethod
    def step(self, token: int) -> np.ndarray:
        """Append one token; return the logits after it."""

    def logits_for(self, context: list[int], targets: list[int]) -> np.ndarray:
        """(len(targets), vocab): the logits that predict each target, the true tokens fed (teacher forcing).
        One token at a time by default, as a last-position-logits graph allows; `context` must not be empty."""
        rows = [self.start(context)]
        for token in targets[:-1]:
            rows.append(self.step(token))
        return np.stack(rows)


class OnnxDecoder(Decoder):
    """The exported graph in onnxruntime: prefill with an empty cache, then one token at a time."""

    def __init__(self, sess: ort.InferenceSession, label: str = "onnxruntime"):
        self.sess, self.label = sess, label
        self.layout = kv_layout(sess)
        context = sess.get_modelmeta().custom_metadata_map.get(CONTEXT_KEY)
        self.max_length = int(context) if context else None
        self.outputs = [o.name for o in sess.get_outputs()]
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    @classmethod
    def from_file(cls, model_file: str | Path, provider: str = "CPUExecutionProvider", threads: int = 1,
                  label: str | None = None) -> OnnxDecoder:
        return cls(session(str(model_file), provider, threads), label or f"onnxruntime ({Path(model_file).name})")

    def start(self, ids: list[int]) -> np.ndarray:
        self.past, self.length = self.layout.empty(), 0
        return self._run(np.array([ids], dtype=np.int64))

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], dtype=np.int64))

    def _run(self, ids: np.ndarray) -> np.ndarray:
        out = self.sess.run(self.outputs, feed(ids, self.past, self.length))
        self.past = dict(zip(self.layout.names, out[1:], strict=True))
        self.length += ids.shape[1]
        return out[0][0, -1].astype(np.float32)


class TorchDecoder(Decoder):
    """A transformers model through its own cache (the model as PyTorch runs it, compressed or not)."""

    def __init__(self, model: PreTrainedModel, label: str = "PyTorch", max_length: int | None = None):
        self.model, self.label, self.max_length = model, label, max_length
        self.past = None

    @torch.no_grad()
    def start(self, ids: list[int]) -> np.ndarray:
        self.past = None
        return self._run(torch.tensor([ids]))

    @torch.no_grad()
    def step(self, token: int) -> np.ndarray:
        return self._run(torch.tensor([[token]]))

    @torch.no_grad()
    def logits_for(self, context: list[int], targets: list[int]) -> np.ndarray:
        """One forward pass: PyTorch returns the logits of every position."""
        self.past = None
        logits = self.model(input_ids=torch.tensor([context + targets[:-1]])).logits[0, len(context) - 1 :]
        return logits.float().numpy()

    def _run(self, ids: torch.Tensor) -> np.ndarray:
        out = self.model(input_ids=ids, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, the stop string's included
    text: str  # decoded, cut before the first stop string
    stopped_by: str  # "stop string", "end of sequence" or "max new tokens"
    logits: list[np.ndarray] = field(default_factory=list)  # after the prompt and after each token (keep_logits)


def generate(
    decoder: Decoder,
    prompt: list[int],
    max_new_tokens: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    stop_strings: tuple[str, ...] = (),
    eos_token_ids: tuple[int, ...] = (),
    keep_logits: bool = False,
) -> Generation:
    """Greedy decoding: stops at an end-of-sequence token, when the decoded text contains a stop string, after
    `max_new_tokens`, or when the decoder's context is full (a prompt longer than it keeps its last tokens). Ties
    go to the lowest token id, as torch.argmax (and so transformers' `generate`) does."""
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to decode the text")
    if decoder.max_length:
        prompt = prompt[-(decoder.max_length - 1):]
        max_new_tokens = min(max_new_tokens, decoder.max_length - len(prompt))
    logits = decoder.start(prompt)
    kept = [logits] if keep_logits else []
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(np.argmax(logits))
        tokens.append(token)
        if token in eos_token_ids:
            return _finish(tokens[:-1], tokens, tokenizer, stop_strings, "end of sequence", kept)
        if stop_strings and _first_stop(tokenizer.decode(tokens), stop_strings) is not None:
            return _finish(tokens, tokens, tokenizer, stop_strings, "stop string", kept)
        if len(tokens) == max_new_tokens:
            break
        logits = decoder.step(token)
        if keep_logits:
            kept.append(logits)
    return _finish(tokens, tokens, tokenizer, stop_strings, "max new tokens", kept)


def _first_stop(text: str, stop_strings: tuple[str, ...]) -> int | None:
    found = [text.find(stop) for stop in stop_strings if stop in text]
    return min(found) if found else None


def _finish(text_tokens, tokens, tokenizer, stop_strings, reason, kept) -> Generation:
    text = tokenizer.decode(text_tokens) if tokenizer is not None else ""
    cut = _first_stop(text, stop_strings)
    return Generation(tokens=tokens, text=text if cut is None else text[:cut], stopped_by=reason, logits=kept)
