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
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from exporter.contracts import TokenizerCheck

# the split `ByteLevel(use_regex=True)` makes (tokenizers' byte_level.rs), as a regex any runtime can be told
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
TEXTS_CHECKED = 64


def write_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """`save_pretrained`, with a byte-level BPE's implied split written out (module docstring)."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():  # a slow (Python) tokenizer: runtimes read its own files
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    split = _explicit_split(data.get("pre_tokenizer"))
    if split is not None:
        data["pre_tokenizer"] = split
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _explicit_split(pre_tokenizer: dict | None) -> dict | None:
    """Split(GPT-2 regex) then ByteLevel without a regex: the same pieces, named. Only where ByteLevel stands alone
    and adds no prefix space (with a Split before it, it would add one to every piece, not only the first)."""
    if (pre_tokenizer or {}).get("type") != "ByteLevel" or not pre_tokenizer.get("use_regex", True) \
            or pre_tokenizer.get("add_prefix_space"):
        return None
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_SPLIT}, "behavior": "Isolated", "invert": False},
        {**pre_tokenizer, "use_regex": False},
    ]}


def plain_byte_level(path: Path) -> None:
    """transformers' GGUF reader writes a byte-level BPE with SentencePiece leftovers (byte fallback, a "▁"
    decoder): equivalent for transformers (byte-level pieces never fall back), but onnxruntime-extensions then
    encodes spaces and newlines as unknown tokens. Written as the plain byte-level BPE it is."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if (data.get("pre_tokenizer") or {}).get("type") != "ByteLevel" or data["model"].get("type") != "BPE":
        return
    data["model"]["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
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
