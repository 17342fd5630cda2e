"""Evaluation: grading rules, perplexity windows, real task data graded in the sandbox, and the eval command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED_DATA, build_tiny
from hypothesis import given
from hypothesis import strategies as st

from exporter import evaluate as ev
from exporter.cli import main
from exporter.errors import UsageError
from exporter.generate import TorchDecoder
from exporter.grading import final_number, get_eval_task, parse_eval_spec, same_number
from exporter.models import normalize_


@pytest.mark.parametrize(("text", "number"), [
    ("She pays 3*4 = <<3*4=12>>12 dollars.\n#### 1,234", "1234"),
    ("so the answer is $5.50.", "5.50"),
    ("first 3 then 7 and finally 42", "42"),
    ("#### -8 apples, 9 pears", "-8"),
    ("no digits here", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_same_number_compares_values():
    assert same_number("18", "18.0") and not same_number("18", "19") and not same_number(None, "1")


@given(st.integers(0, 40), st.integers(0, 1500))
def test_windows_score_every_answer_token_once(context_len, answer_len):
    context, answer = list(range(context_len)), list(range(1000, 1000 + answer_len))
    pieces = ev.windows(context, answer)
    targets = [t for _, piece in pieces for t in piece]
    assert targets == (answer if context else answer[1:])
    for piece_context, piece in pieces:
        assert piece_context and len(piece_context) + len(piece) <= ev.WINDOW


def test_perplexity_matches_cross_entropy_of_one_forward(tokenizer):
    model = normalize_(build_tiny("llama"))
    prompt, answer = "def f(x):", "\n    return x + 1\n"
    scores = ev.score_texts(TorchDecoder(model), tokenizer, [(prompt, answer)])
    context, targets = tokenizer(prompt).input_ids, tokenizer(answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([context + targets])).logits[0, len(context) - 1 : -1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
    assert scores.perplexity == pytest.approx(math.exp(expected.item()), rel=1e-5)
    against_itself = ev.score_texts(TorchDecoder(model), tokenizer, [(prompt, answer)], TorchDecoder(model))
    assert against_itself.top1_vs_reference == 1.0 and abs(against_itself.kl_vs_reference) < 1e-9


@pytest.mark.parametrize("task", ["mbpp", "humaneval"])
def test_reference_solutions_pass_and_wrong_ones_fail_in_the_sandbox(task):
    items = get_eval_task(task).items(SHARED_DATA, 3, 0)
    for item in items:
        passed, detail = item.grade(item.answer)
        assert passed, (item.id, detail)
        assert not item.grade("    return None\n" if task == "humaneval" else "x = 1\n")[0]


def test_gsm8k_items_grade_the_final_number():
    items = get_eval_task("gsm8k").items(SHARED_DATA, 2, 0)
    for item in items:
        assert item.grade(item.answer)[0]
        assert not item.grade("I do not know.")[0]
        assert "Question:" in item.prompt and item.chat[-1]["role"] == "user"
        assert item.prompt.count("Question:") == 4  # three examples from train, then the test question


def test_eval_specs():
    assert parse_eval_spec("gsm8k:7")[0][1] == 7 and parse_eval_spec("mbpp")[0][1] == 50
    both = parse_eval_spec("gsm8k:3,mbpp:4")
    assert [(task.name, n) for task, n in both] == [("gsm8k", 3), ("mbpp", 4)]
    for bad in ("gsm8k:0", "gsm8k:x", "poetry:3", "gsm8k:3,"):
        with pytest.raises(UsageError):
            parse_eval_spec(bad)


@pytest.mark.parametrize("arch", ["llama"], indirect=True)
def test_eval_command_on_an_export_folder_and_report(tmp_path, tiny_model_dir):
    from test_pipeline import write_profile

    runner = CliRunner()
    out = tmp_path / "out"
    profile = write_profile(tmp_path / "p.yaml", precision="fp32")
    exported = runner.invoke(main, ["export", "--device", str(profile), "--model", str(tiny_model_dir), "--out",
                                    str(out)])
    assert exported.exit_code == 0, exported.output
    onnx = runner.invoke(main, ["eval", str(out), "--task", "gsm8k", "--limit", "2", "--max-new-tokens", "6"])
    assert onnx.exit_code == 0, onnx.output
    torch_run = runner.invoke(main, ["eval", "--model", str(tiny_model_dir), "--task", "gsm8k", "--limit", "2",
                                     "--max-new-tokens", "6", "--json", str(tmp_path / "dense.json")])
    assert torch_run.exit_code == 0, torch_run.output
    shipped = json.loads((out / "eval-gsm8k.json").read_text())["models"][0]
    dense = json.loads((tmp_path / "dense.json").read_text())["models"][0]
    assert len(shipped["items"]) == 2 and shipped["label"].endswith("(onnxruntime)")
    assert [i["item"] for i in shipped["items"]] == [i["item"] for i in dense["items"]]
    rebuilt = runner.invoke(main, ["report", str(out)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "Task metrics: gsm8k" in (out / "report.html").read_text()


def test_eval_command_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    both = runner.invoke(main, ["eval", str(tmp_path), "--model", "x", "--task", "gsm8k"])
    assert both.exit_code == 2 and "not both" in both.output
    empty = runner.invoke(main, ["eval", str(tmp_path), "--task", "gsm8k"])
    assert empty.exit_code == 2 and "no model.onnx" in empty.output
    report = runner.invoke(main, ["report", str(tmp_path)])
    assert report.exit_code == 2 and "no report.json" in report.output
    task = runner.invoke(main, ["eval", str(tmp_path), "--task", "poetry"])
    assert task.exit_code == 2 and "cannot be evaluated" in task.output
