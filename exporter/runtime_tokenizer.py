"""The tokenizer files an export ships, written so the runtimes apps use split text as transformers does, and the
check that they do.

onnxruntime-genai tokenizes with onnxruntime-extensions, which does not run the `tokenizers` library: for a
byte-level BPE whose pre-tokenizer is plain `ByteLevel(use_regex=True)` it guesses the splitting regex from the
tokenizer class name, and "LlamaTokenizerFast" (what transformers' GGUF loader names every Llama-architecture
tokenizer, SmolLM2's included) makes it split Llama 3's way: "\\n\\n" before a word becomes one piece, indentation
another. SmolLM2 was trained on GPT-2's split; given genai's ids its held-out code loss rose from 0.75 to 0.94 bits
per byte (dense fp32, 80 HumanEval problems). Spelling the split out as an explicit regex removes the guess and
changes nothing for transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from exporter.contracts import TokenizerCheck

# the split `ByteLevel(use_regex=True)` makes (tokenizers' byte_level.rs), as a regex any runtime can be told
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
TEXTS_CHECKED = 64


def write_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """`save_pretrained`, with a byte-level BPE's implied split written out (module docstring)."""
    tokenizer.save_pretrained(folder)
    if (folder / "tokenizer.json").is_file():  # else a slow (Python) tokenizer: runtimes read its own files
        _edit(folder / "tokenizer.json", _spell_out_split)


def _spell_out_split(data: dict) -> bool:
    """Split(GPT-2 regex) then ByteLevel without a regex: the same pieces, named. Only where ByteLevel stands alone
    and adds no prefix space (with a Split before it, it would add one to every piece, not only the first)."""
    pre_tokenizer = data.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") != "ByteLevel" or not pre_tokenizer.get("use_regex", True) \
            or pre_tokenizer.get("add_prefix_space"):
        return False
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_SPLIT}, "behavior": "Isolated", "invert": False},
        {**pre_tokenizer, "use_regex": False},
    ]}
    return True


def plain_byte_level(path: Path) -> None:
    """transformers' GGUF reader writes a byte-level BPE with SentencePiece leftovers (byte fallback, a "▁"
    decoder): equivalent for transformers (byte-level pieces never fall back), but onnxruntime-extensions then
    encodes spaces and newlines as unknown tokens. Written as the plain byte-level BPE it is."""
    _edit(path, _without_sentencepiece_leftovers)


def _without_sentencepiece_leftovers(data: dict) -> bool:
    if (data.get("pre_tokenizer") or {}).get("type") != "ByteLevel" or data["model"].get("type") != "BPE":
        return False
    data["model"]["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return True


def _edit(path: Path, change: Callable[[dict], bool]) -> None:
    """tokenizer.json rewritten where `change` (which edits it in place) says it changed something."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if change(data):
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def check_runtime_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> TokenizerCheck:
    """Whether onnxruntime-genai, reading the export folder, gives the token ids the quality was measured with
    (the model's tokenizer, no special tokens added: genai's default) on the target application's texts."""
    texts = texts[:TEXTS_CHECKED]
    try:
        import onnxruntime_genai as og
    except ImportError:
        return TokenizerCheck(runtime=None, texts=len(texts), differing=0, first_difference="", passed=True)
    runtime = og.Tokenizer(str(folder))
    differing, first = 0, ""
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False).input_ids
        theirs = [int(i) for i in runtime.encode(text)]
        if ours != theirs:
            differing += 1
            first = first or _first_difference(tokenizer, text, ours, theirs)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    bos_left_out = tokenizer.bos_token if adds_bos and int(runtime.encode("x")[0]) != tokenizer.bos_token_id else ""
    return TokenizerCheck(runtime=f"onnxruntime-genai {og.__version__}", texts=len(texts), differing=differing,
                          first_difference=first, passed=differing == 0, bos_left_out=bos_left_out)


def _first_difference(tokenizer: PreTrainedTokenizerBase, text: str, ours: list[int], theirs: list[int]) -> str:
    """Where the two encodings part, as the pieces each makes of the text there."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    pieces = [[tokenizer.decode([i]) for i in ids[at:at + 3]] for ids in (ours, theirs)]
    return f"{text[:40]!r}...: the model's tokenizer {pieces[0]}, the runtime {pieces[1]}"
