"""The `edgeslim` command: builds a RunConfig from flags, runs it, and maps errors to one line and an exit code.

Exit codes: 0 validated and within budget; 1 validation or budget check failed; 2 bad input; 3 no plan can meet
the budget. Nothing else lives here.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from exporter.contracts import MIB, to_dict
from exporter.errors import EdgeslimError, UsageError
from exporter.select import method_names
from exporter.tasks import DEFAULT_TASK, TASKS

if TYPE_CHECKING:
    from exporter.pipeline import RunConfig


def _one_line_errors(command):
    """Turn the project's errors into `edgeslim: error: ...` and their exit code, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EdgeslimError as exc:
            click.echo(f"edgeslim: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("edgeslim: interrupted; no output was written", err=True)
            sys.exit(130)
        except OSError as exc:  # a full disk or a vanished folder: the run wrote nothing that looks finished
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"edgeslim: error: {exc.strerror or exc}{where}; no output was written", err=True)
            sys.exit(1)

    return wrapper


@click.group()
@click.version_option(package_name="edgeslim")
def main() -> None:
    """Shrink a pretrained LLM for one application until it fits a device; export it to ONNX and prove it."""


_device = click.option("--device", "device", required=True, type=click.Path(dir_okay=False),
                       help="Device profile YAML (see `edgeslim devices`).")
_model = click.option("--model", default=None,
                      help="Model folder, .gguf file or Hugging Face id. Default: embedded SmolLM2-135M-Instruct.")
_max_new_tokens = click.option("--max-new-tokens", default=256, show_default=True, type=int,
                               help="Longest completion per evaluation item.")
_safety = [
    click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt pickle weights (they can run code)."),
    click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's folder or hub."),
]


def _with(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


_planning = [  # what the plan depends on: `export` and `plan` take the same options and make the same plan
    _device,
    _model,
    click.option("--task", default=DEFAULT_TASK, show_default=True, type=str,
                 help=f"Target application: {', '.join(sorted(TASKS))}."),
    click.option("--data-dir", default=None, help="Folder with gsm8k/, mbpp/, wikitext2/ (default: ../shared/data)."),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--no-cache", is_flag=True, help="Neither read nor write the per-layer cache (~/.cache/edgeslim)."),
    click.option("--calibration-samples", default=16, show_default=True, type=int,
                 help="Token windows of the task's calibration data."),
    click.option("--calibration-seq-len", default=256, show_default=True, type=int),
    click.option("--allocation", default="sensitivity", show_default=True,
                 help="sensitivity: ranks where they cost the least estimated loss per byte; uniform: one keep "
                      "ratio for every layer."),
    click.option("--rank-multiple", default=None, type=int,
                 help="Round every rank to a multiple of this (default: 32 at int4, MatMulNBits' block; 8 at fp32)."),
    click.option("--layer-streaming/--in-memory", "streaming", default=None,
                 help="Read, compress and export one decoder block at a time (memory: a block and the vocabulary "
                      "table, not the model), or load the whole model. Default: in memory when it fits here."),
    click.option("--method", default="svdllm", show_default=True, type=str,
                 help=f"Basis selection method: {', '.join(method_names())}."),
    *_safety,
]


def _config(**options) -> RunConfig:
    from exporter.pipeline import RunConfig  # heavy imports only when a command runs

    options["use_cache"] = not options.pop("no_cache")
    return RunConfig(**options)


@main.command()
@_with(_planning)
@click.option("--out", default=None, help="Output folder. Default: ./edgeslim-out/<model>-<device>/")
@click.option("--max-ppl-ratio", default=None, type=float,
              help="Quality gate: held-out perplexity of what ships / the dense model's at the same precision "
                   "(default: the profile's quality.max_ppl_ratio, else 1.25).")
@click.option("--quality-tokens", default=2048, show_default=True, type=int,
              help="Held-out tokens of the task that the quality of what ships is measured on.")
@click.option("--eval", "evaluate", default=None, metavar="TASK[:N],...",
              help="Also measure task metrics of the dense, compressed and shipped models on N items of each task "
                   "(e.g. gsm8k:50,mbpp:50).")
@click.option("--ort", is_flag=True,
              help="Also write model.ort and the operator config for a minimal onnxruntime mobile build, checked "
                   "for the same tokens and for the memory budget.")
@_max_new_tokens
@_one_line_errors
def export(**options):
    """Compress, export to ONNX, validate in onnxruntime and report."""
    from exporter.pipeline import run

    result = run(_config(**options))
    if result is not None:  # None: a helper process of a multi-process launch (relearning only)
        click.echo(f"wrote {result.artifact.folder}: validated, every budget met, quality within "
                   f"{result.profile.max_ppl_ratio:g}x of the dense model")


@main.command()
@_with(_planning)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_one_line_errors
def plan(as_json, **options):
    """Plan per-layer ranks for a device, without compressing anything."""
    from exporter.footprint import export_footprint
    from exporter.pipeline import plan_only
    from exporter.profile import load_profile
    from exporter.providers import plan_notes
    from exporter.select import get_method

    loaded, rank_plan = plan_only(_config(**options))
    if as_json:
        data = to_dict(rank_plan)
        data["layers"] = [{**layer, "shape": [layer["d_out"], layer["d_in"]],
                           "kind": "dense" if layer["rank"] is None else "factorized"} for layer in data["layers"]]
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    p, budget = rank_plan.predicted, rank_plan.device
    computes = f", {rank_plan.activations} activations" if rank_plan.precision == "int4" else ""
    if rank_plan.allocation == "dense":
        click.echo(f"{loaded.name} on {budget}: the dense {rank_plan.precision} model fits; nothing to factorize")
    else:
        estimate = ("" if rank_plan.estimated_loss_increase is None
                    else f", estimated loss +{rank_plan.estimated_loss_increase:.3f} nats/token")
        vocabulary = ("" if rank_plan.vocabulary is None
                      else f", {rank_plan.vocabulary:,} vocabulary rows kept (the rest share one)")
        click.echo(f"{loaded.name} on {budget}: keep {rank_plan.keep_ratio:.1%} of projection weights, "
                   f"{len(rank_plan.factorized)}/{len(rank_plan.layers)} layers factorized{vocabulary} "
                   f"({rank_plan.allocation}{estimate})")
    click.echo(f"predicted{computes}: weights {p.weights_bytes / MIB:.1f} MiB, memory {p.memory_bytes / MIB:.1f} "
               f"MiB, decode {p.decode_ms_per_token:.1f} ms/token, prefill {p.prefill_ms:.0f} ms")
    profile = load_profile(options["device"])
    for note in plan_notes(profile):
        click.echo(f"note: {note}")
    needed = export_footprint(loaded.model, profile.memory_budget_mib * MIB)
    relearning = ""
    if get_method(options["method"]).needs == "blocks":  # relearning a block at a time: streamed only
        peak = needed.streamed_peak_bytes + needed.relearning_bytes
        minutes = (needed.streamed_seconds + needed.relearning_seconds) / 60
        relearning = f" (with {options['method']}'s relearning: {peak / 1e9:.1f} GB, {minutes:.1f} min)"
    click.echo(f"exporting it needs about {needed.peak_bytes / 1e9:.1f} GB and {needed.seconds / 60:.1f} min in "
               f"memory, {needed.streamed_peak_bytes / 1e9:.1f} GB and {needed.streamed_seconds / 60:.1f} min a block "
               f"at a time (--layer-streaming){relearning} (predicted: README, \"Scale\")")


@main.command(name="eval")
@click.argument("folder", required=False, type=click.Path(file_okay=False))
@_model
@click.option("--task", required=True, help="gsm8k, mbpp, humaneval, code or wikitext.")
@click.option("--limit", default=50, show_default=True, type=int, help="Items to evaluate.")
@click.option("--reference", default=None,
              help="A (dense) model to compare with: top-1 agreement and KL on the reference answers.")
@click.option("--data-dir", default=None, help="Folder with gsm8k/, mbpp/, wikitext2/ (default: ../shared/data).")
@click.option("--seed", default=0, show_default=True, type=int, help="Chooses the items (and GSM8K's examples).")
@click.option("--threads", default=None, type=int, help="onnxruntime threads (default: all cores).")
@click.option("--json", "json_path", default=None, help="Also write the results to this file.")
@_max_new_tokens
@_with(_safety)
@_one_line_errors
def eval_(folder, model, task, limit, reference, data_dir, seed, threads, json_path, max_new_tokens, allow_pickle,
          trust_remote_code):
    """Task metrics of an export FOLDER (through onnxruntime) or of --model (through PyTorch)."""
    from rich.console import Console

    from exporter.evaluate import decoder_for_folder, evaluate
    from exporter.generate import TorchDecoder
    from exporter.grading import get_eval_task
    from exporter.models import load_model
    from exporter.report import print_evaluation, write_evaluation
    from exporter.tasks import data_dir as data_folder

    if (folder is None) == (model is None):
        raise UsageError("give an export FOLDER (evaluated in onnxruntime) or --model (in PyTorch), not both")
    if limit < 1 or max_new_tokens < 1:
        flag, value = ("--limit", limit) if limit < 1 else ("--max-new-tokens", max_new_tokens)
        raise UsageError(f"{flag} {value}: must be a positive integer")
    eval_task = get_eval_task(task)
    items = eval_task.items(data_folder(data_dir), limit, seed)
    if folder is not None:
        decoder, tokenizer = decoder_for_folder(folder, threads)
    else:
        loaded = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        decoder, tokenizer = TorchDecoder(loaded.model, f"{loaded.name} (PyTorch)"), loaded.tokenizer
    ref = None
    if reference is not None:
        dense = load_model(reference, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        ref = TorchDecoder(dense.model, f"{dense.name} (PyTorch, reference)")
    result = evaluate([decoder], tokenizer, eval_task, items, seed, max_new_tokens, reference=ref)
    print_evaluation(result, Console())
    paths = [Path(folder) / f"eval-{eval_task.name}.json"] if folder else []
    for path in paths + ([Path(json_path)] if json_path else []):
        write_evaluation(result, path)
        click.echo(f"wrote {path}")


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@_one_line_errors
def report(folder):
    """(Re)build FOLDER/report.html from its report.json and any eval-*.json."""
    from exporter.report_html import write_html

    click.echo(f"wrote {write_html(Path(folder))}")


@main.command()
@_device
@click.option("--results", "results", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="A JSON result of scripts/bench_on_device.py run on the device (repeat for several).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="The calibrated profile. Default: <profile>-measured.yaml beside the profile.")
@_one_line_errors
def calibrate(device, results, out):
    """Fit a device profile's bandwidth and compute to latencies measured on the device."""
    from exporter.calibrate import calibrate as fit_profile

    device_path = Path(device)
    out_path = Path(out) if out else device_path.with_name(f"{device_path.stem}-measured.yaml")
    before, after, fitted = fit_profile(device_path, [Path(r) for r in results], out_path)
    for path, (b_prefill, b_decode), (a_prefill, a_decode) in zip(results, before, after, strict=True):
        click.echo(f"{path}: prediction error prefill {b_prefill:+.0%} -> {a_prefill:+.0%}, "
                   f"decode {b_decode:+.0%} -> {a_decode:+.0%}")
    click.echo(f"wrote {out_path}: memory_bandwidth_gbps {fitted.memory_bandwidth_gbps:g}, "
               f"compute_gflops {fitted.compute_gflops:g}, op_overhead_us {fitted.op_overhead_us:g}")


@main.command()
@_one_line_errors
def devices():
    """The shipped device profiles, one line each."""
    from exporter.profile import load_profile, shipped_profiles

    for path in shipped_profiles():
        p = load_profile(path)
        click.echo(f"{path.stem:18} {p.precision:5} {p.memory_budget_mib:>7g} MiB  ctx {p.context_length:>5}  "
                   f"decode ≤{p.decode_ms_per_token:g} ms  {p.description}")


if __name__ == "__main__":
    main()
