"""Budget checks, report.json and the console summary.

Where each figure comes from is part of the result: file size and memory measured here hold on the device (same
graph, same runtime kernels); latency measured here is *this machine's*, so the device's latency budgets are
judged on the cost model's prediction for the device, marked "predicted", and the model itself is checked by
comparing its prediction for this machine with what was measured here.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from exporter.contracts import (
    MIB,
    BudgetCheck,
    DeviceProfile,
    Evaluation,
    Measurement,
    OnnxArtifact,
    OrtPackage,
    ParityResult,
    Prediction,
    Quality,
    RankPlan,
    RunResult,
    TokenizerCheck,
    to_json,
)
from exporter.providers import plan_notes


def budget_checks(
    profile: DeviceProfile, plan: RankPlan, artifact: OnnxArtifact, measured: Measurement
) -> tuple[BudgetCheck, ...]:
    budget_mib = profile.memory_budget_mib
    here = f"measured here ({measured.threads} threads, {measured.provider})"
    return (
        BudgetCheck("file size", budget_mib, plan.predicted.weights_bytes / MIB, artifact.file_bytes / MIB, "MiB",
                    "measured", artifact.file_bytes <= profile.memory_budget_bytes, "weights must fit in memory"),
        BudgetCheck("peak memory", budget_mib, plan.predicted.memory_bytes / MIB,
                    measured.peak_memory_bytes / MIB, "MiB", "measured",
                    measured.peak_memory_bytes <= profile.memory_budget_bytes,
                    f"onnxruntime session, prefill {profile.prefill_tokens} + KV cache at {profile.context_length}"),
        BudgetCheck("decode", profile.decode_ms_per_token, plan.predicted.decode_ms_per_token,
                    measured.decode_ms_per_token, "ms/token", "predicted",
                    plan.predicted.decode_ms_per_token <= profile.decode_ms_per_token,
                    f"device figure predicted; {here}"),
        BudgetCheck(f"prefill {profile.prefill_tokens} tokens", profile.prefill_ms, plan.predicted.prefill_ms,
                    measured.prefill_ms, "ms", "predicted", plan.predicted.prefill_ms <= profile.prefill_ms,
                    f"device figure predicted; {here}"),
    )


def failure_lines(parity: list[ParityResult], checks: tuple[BudgetCheck, ...], quality: Quality | None = None,
                  plan: RankPlan | None = None) -> tuple[str, ...]:
    """One line per failed parity check, budget or quality gate, with the figure that failed."""
    lines = [f"parity {p.graph} on {p.provider}: max |Δlogits| {p.max_abs_logit_diff:.3g} (tolerance "
             f"{p.tolerance:.3g}), greedy tokens identical: {p.greedy_identical}"
             for p in parity if p.gated and not p.passed]
    lines += [f"{c.metric}: {c.measured if c.judged_on == 'measured' else c.predicted:.1f} {c.unit} "
              f"({c.judged_on}) > budget {c.budget:g} {c.unit}" for c in checks if not c.passed]
    if quality is not None and not quality.passed:
        lines.append(quality_failure(quality, plan))
    return tuple(lines)


def ort_failures(package: OrtPackage | None, profile: DeviceProfile) -> tuple[str, ...]:
    """`export --ort`: the ORT file must reproduce the .onnx's greedy tokens and fit the memory budget too."""
    if package is None:
        return ()
    lines = []
    if not package.tokens_identical:
        lines.append(f"ORT format: greedy tokens differ from the .onnx's after {package.same_prefix} of "
                     f"{package.greedy_steps}")
    peak = package.measurement.peak_memory_bytes / MIB
    if peak > profile.memory_budget_mib:
        lines.append(f"ORT format: peak memory {peak:.1f} MiB (measured) > budget {profile.memory_budget_mib:g} MiB "
                     "(onnxruntime reads an .ort file's weights into memory, where it maps the .onnx's data file)")
    return tuple(lines)


def tokenizer_failures(check: TokenizerCheck | None) -> tuple[str, ...]:
    """A runtime that tokenizes the target's texts differently runs a model other than the one measured."""
    if check is None or check.passed:
        return ()
    return (f"tokenizer: {check.runtime} encodes {check.differing} of {check.texts} held-out texts differently from "
            f"the model's tokenizer ({check.first_difference}); apps would get worse quality than measured",)


def quality_failure(quality: Quality, plan: RankPlan | None) -> str:
    """What was measured, and what would meet the gate."""
    line = (f"quality: held-out {quality.task} perplexity {quality.shipped_perplexity:.2f} is "
            f"{quality.ratio:.2f}x the dense model's {quality.reference_perplexity:.2f} at the same precision "
            f"(limit {quality.max_ratio:g}x)")
    if plan is not None and plan.allocation != "dense":
        dense = plan.dense_predicted
        line += (f"; the dense {plan.precision} model needs {dense.memory_bytes / MIB:.0f} MiB, "
                 f"{dense.decode_ms_per_token:.0f} ms/token and {dense.prefill_ms:.0f} ms prefill (predicted): "
                 "raise the budget towards that, or allow more loss with quality.max_ppl_ratio")
    return line


def latency_model_check(host_predicted: Prediction, measured: Measurement) -> dict:
    """Measured / predicted for this machine: near 1 means the latency model can be trusted for the device."""
    return {
        "decode_measured_over_predicted": round(measured.decode_ms_per_token / host_predicted.decode_ms_per_token, 3),
        "prefill_measured_over_predicted": round(measured.prefill_ms / host_predicted.prefill_ms, 3),
    }


def write_report(result: RunResult, folder: Path) -> None:
    (folder / "report.json").write_text(to_json(result))


def write_evaluation(evaluation: Evaluation, path: Path) -> None:
    """Written beside, then renamed: an interrupted write leaves no half file under the final name."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(to_json(evaluation))
    os.replace(partial, path)


def print_evaluation(evaluation: Evaluation, console: Console) -> None:
    table = Table(title=f"{evaluation.task}: {evaluation.items} items (seed {evaluation.seed}, "
                  f"≤{evaluation.max_new_tokens} new tokens)")
    for column in ("model", "metric", "score", "answer perplexity", "top-1 vs reference", "KL vs reference",
                   "seconds"):
        table.add_column(column, justify="left" if column in ("model", "metric") else "right")
    for m in evaluation.models:
        table.add_row(m.label, m.metric, "" if m.score is None else f"{m.score:.1%}", f"{m.perplexity:.2f}",
                      "" if m.top1_vs_reference is None else f"{m.top1_vs_reference:.1%}",
                      "" if m.kl_vs_reference is None else f"{m.kl_vs_reference:.3f}", f"{m.seconds:.0f}")
    console.print(table)
    if evaluation.sandbox_network:
        console.print(f"code ran sandboxed (network cut off by {evaluation.sandbox_network})")


def print_summary(result: RunResult, console: Console) -> None:
    table = Table(title=f"{result.model} on {result.profile.name} ({result.profile.precision}, "
                  f"{result.method}, task {result.task})")
    for column in ("metric", "budget", "predicted (device)", "measured (here)", "judged on", "result"):
        table.add_column(column, justify="left" if column in ("metric", "judged on") else "right")
    for check in result.checks:
        table.add_row(
            check.metric,
            _fmt(check.budget, check.unit),
            _fmt(check.predicted, check.unit),
            _fmt(check.measured, check.unit),
            check.judged_on,
            "[green]pass[/]" if check.passed else "[red]FAIL[/]",
        )
    for parity in result.parity:
        provider = parity.provider.removesuffix("ExecutionProvider")
        if parity.gated:
            table.add_row(f"parity {parity.graph} on {provider}", "", "",
                          f"Δ {parity.max_abs_logit_diff:.2g} ≤ {parity.tolerance:.2g}", "measured",
                          "[green]pass[/]" if parity.passed else "[red]FAIL[/]")
        else:
            table.add_row(f"{parity.graph} vs exact on {provider}", "", "",
                          f"greedy {parity.greedy_match_fraction:.0%} same", "measured", "reported")
    if result.quality is not None:
        q = result.quality
        table.add_row(f"quality: {q.task} perplexity ratio", f"{q.max_ratio:g}x", "", f"{q.ratio:.3f}x",
                      f"measured ({q.tokens} tokens)", "[green]pass[/]" if q.passed else "[red]FAIL[/]")
    if result.tokenizer is not None:
        t = result.tokenizer
        table.add_row("tokenizer of the runtime", "same ids", "",
                      f"{t.texts - t.differing} of {t.texts} texts same" if t.runtime else "not installed here",
                      t.runtime or "", ("[green]pass[/]" if t.passed else "[red]FAIL[/]") if t.runtime else "skipped")
    console.print(table)
    plan = result.plan
    computes = f" ({plan.activations} activations)" if plan.precision == "int4" else ""
    if plan.allocation == "dense":
        console.print(f"the dense {plan.precision}{computes} model fits every budget: shipped dense, nothing "
                      "factorized")
    else:
        estimate = ("" if plan.estimated_loss_increase is None else
                    f"; estimated loss +{plan.estimated_loss_increase:.3f} nats/token")
        vocabulary = ("" if plan.vocabulary is None
                      else f", {plan.vocabulary:,} vocabulary rows kept (the rest share one)")
        console.print(
            f"kept {plan.keep_ratio:.1%} of the decoder projections' weights: {len(plan.factorized)} of "
            f"{len(plan.layers)} layers factorized{vocabulary} ({plan.allocation} allocation{estimate}); "
            f"{plan.precision}{computes}"
        )
    if result.quality is not None:
        q = result.quality
        console.print(
            f"held-out {q.task} ({q.tokens} tokens): shipped perplexity {q.shipped_perplexity:.2f}, dense "
            f"{plan.precision} {q.reference_perplexity:.2f} (ratio {q.ratio:.3f}, limit {q.max_ratio:g}), dense fp32 "
            f"{q.dense_fp32_perplexity:.2f}; next token same as dense {plan.precision} at {q.top1_vs_reference:.1%}, "
            f"KL {q.kl_vs_reference:.3f} nats/token"
        )
    if result.quantization_top1_agreement is not None:
        console.print(f"{result.profile.precision} weights agree with their fp32 values on the next token at "
                      f"{result.quantization_top1_agreement:.1%} of prompt positions")
    if result.tokenizer is not None and result.tokenizer.bos_left_out:
        console.print(f"note: the model's tokenizer starts a text with {result.tokenizer.bos_left_out!r}; "
                      f"{result.tokenizer.runtime} adds it only when told (tokenizer.update_options("
                      "add_special_tokens='true')); quality here was measured without it")
    for note in plan_notes(result.profile):
        console.print(f"note: {note}")
    for fit in result.providers:
        if fit.provider in result.providers_not_available:
            console.print(f"{fit.provider}: not available here (this onnxruntime offers {', '.join(_available())}); "
                          f"on the device it {fit.summary}")
    if result.ort_package is not None:
        package = result.ort_package
        console.print(f"ORT format: {package.model_file} ({package.model_bytes / 1e6:.1f} MB) and "
                      f"{package.operators_file} ({len(package.operator_lines)} operator lines for a minimal build); "
                      f"greedy tokens {'identical' if package.tokens_identical else 'DIFFERENT'}, peak "
                      f"{package.measurement.peak_memory_bytes / MIB:.1f} MiB, decode "
                      f"{package.measurement.decode_ms_per_token:.1f} ms/token")
    check = latency_model_check(result.host_predicted, result.measurement)
    console.print(
        f"latency model on this machine: measured/predicted decode {check['decode_measured_over_predicted']}, "
        f"prefill {check['prefill_measured_over_predicted']}"
    )
    for evaluation in result.evaluations:
        print_evaluation(evaluation, console)
    for failure in result.failures:
        console.print(f"[red]failed:[/] {failure}")


def _fmt(value: float | None, unit: str) -> str:
    return "" if value is None else f"{value:,.1f} {unit}"


def _available() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()
