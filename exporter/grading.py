"""What each evaluation task asks the model and how an answer is graded.

- gsm8k: exact match of the final number. The prompt is `GSM8K_SHOTS` worked examples from the *train* split, then
  the test question: as a chat (each example a user turn and an assistant turn) when the tokenizer has a chat
  template, as "Question: ...\\nAnswer: ... #### N" text otherwise. The answer is the number after "####" in the
  completion, else the last number in it; both sides lose commas, "$" and a trailing ".", and compare as numbers.
- mbpp: pass@1 (one greedy completion). The prompt is `MBPP_SHOTS` solved problems from MBPP's few-shot split (task
  ids 1-10) written as a docstring (problem text and first test) followed by the code, then the test problem's
  docstring. The completion plus the problem's setup code and all its tests run in the sandbox.
- humaneval (and code): pass@1. The prompt is the problem's prompt; prompt + completion + the problem's `check`
  run in the sandbox.
- wikitext: perplexity only (no generation).
Every task also reports the perplexity of the reference answer given the item's own prompt (no shots).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import UsageError
from exporter.sandbox import run_untrusted
from exporter.tasks import get_task, humaneval_rows, mbpp_prompt, mbpp_rows, read_jsonl, sample

GSM8K_SHOTS = 3
MBPP_SHOTS = 2
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: str  # what the model is asked, shots included
    context: str  # the item's own prompt, for the answer's perplexity
    answer: str  # the reference answer
    grade: Callable[[str], tuple[bool, str]] | None  # completion -> (correct, detail); None: perplexity only
    chat: tuple[dict[str, str], ...] = ()  # the same request as chat messages, used where a chat template exists


@dataclass(frozen=True)
class EvalTask:
    name: str
    metric: str  # "exact match", "pass@1" or "perplexity"
    stop_strings: tuple[str, ...]
    items: Callable[[Path, int, int], list[EvalItem]]  # (data folder, limit, seed) -> items


def final_number(text: str) -> str | None:
    """The number after "####", else the last number in the text; commas, "$" and a trailing "." removed."""
    marked = text.split("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(marked.replace("$", ""))
    if not found:
        return None
    return (found[0] if "####" in text else found[-1]).replace(",", "").rstrip(".")


def same_number(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def _gsm8k_items(root: Path, limit: int, seed: int) -> list[EvalItem]:
    shots = random.Random(seed).sample(read_jsonl(root / "gsm8k" / "train.jsonl"), GSM8K_SHOTS)
    header = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in shots)
    turns = [{"role": role, "content": r[field]} for r in shots
             for role, field in (("user", "question"), ("assistant", "answer"))]
    rows = sample(read_jsonl(root / "gsm8k" / "test.jsonl"), limit, seed)
    items = []
    for index, row in enumerate(rows):
        expected = final_number(row["answer"])

        def grade(completion: str, expected=expected) -> tuple[bool, str]:
            got = final_number(completion)
            return same_number(got, expected), f"answered {got}, expected {expected}"

        question = f"Question: {row['question']}\nAnswer:"
        chat = (*turns, {"role": "user", "content": row["question"]})
        items.append(EvalItem(f"test-{index}", header + question, question, " " + row["answer"], grade, chat))
    return items


def _sandboxed(program_for: Callable[[str], str]) -> Callable[[str], tuple[bool, str]]:
    def grade(completion: str) -> tuple[bool, str]:
        outcome = run_untrusted(program_for(completion))
        return outcome.passed, outcome.detail

    return grade


def _mbpp_items(root: Path, limit: int, seed: int) -> list[EvalItem]:
    shots = [r for r in mbpp_rows(root, 1, 10)][1 : 1 + MBPP_SHOTS]
    header = "".join(mbpp_prompt(r) + r["code"].replace("\r\n", "\n").strip() + "\n\n\n" for r in shots)
    items = []
    for row in sample(mbpp_rows(root, 11, 510), limit, seed):
        tests = "\n".join([row["test_setup_code"], *row["test_list"]])
        prompt = mbpp_prompt(row)
        items.append(EvalItem(f"mbpp-{row['task_id']}", header + prompt, prompt, row["code"],
                              _sandboxed(lambda completion, tests=tests: completion + "\n\n" + tests + "\n")))
    return items


def _humaneval_items(root: Path, limit: int, seed: int) -> list[EvalItem]:
    items = []
    for row in sample(humaneval_rows(root), limit, seed):
        def program(completion: str, row=row) -> str:
            return f"{row['prompt']}{completion}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"

        items.append(EvalItem(row["task_id"], row["prompt"], row["prompt"], row["canonical_solution"],
                              _sandboxed(program)))
    return items


def _wikitext_items(root: Path, limit: int, seed: int) -> list[EvalItem]:
    pairs = sample(get_task("wikitext").heldout(root), limit, seed)
    return [EvalItem(f"wikitext-{i}", "", prompt, text, None) for i, (prompt, text) in enumerate(pairs)]


CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n\n\n")
EVAL_TASKS = {
    task.name: task
    for task in [
        EvalTask("gsm8k", "exact match", ("\n\nQuestion:", "\nQuestion:"), _gsm8k_items),
        EvalTask("mbpp", "pass@1", CODE_STOPS, _mbpp_items),
        EvalTask("humaneval", "pass@1", CODE_STOPS, _humaneval_items),
        EvalTask("code", "pass@1", CODE_STOPS, _humaneval_items),
        EvalTask("wikitext", "perplexity", (), _wikitext_items),
    ]
}


def get_eval_task(name: str, flag: str = "--task") -> EvalTask:
    try:
        return EVAL_TASKS[name]
    except KeyError:
        raise UsageError(f"{flag} {name}: cannot be evaluated; choose one of {', '.join(EVAL_TASKS)}") from None


DEFAULT_ITEMS = 50


def parse_eval_spec(spec: str) -> list[tuple[EvalTask, int]]:
    """`task[:N][,task[:N]...]` (N items, default `DEFAULT_ITEMS`) as `export --eval` takes it."""
    parsed = []
    for part in spec.split(","):
        name, _, count = part.strip().partition(":")
        if not name:
            raise UsageError(f"--eval {spec}: a task name is missing; write e.g. gsm8k:50,mbpp:50")
        if count and (not count.isdigit() or int(count) < 1):
            raise UsageError(f"--eval {spec}: the item count must be a positive integer, e.g. {name}:50")
        parsed.append((get_eval_task(name, f"--eval {spec}: task"), int(count) if count else DEFAULT_ITEMS))
    return parsed
