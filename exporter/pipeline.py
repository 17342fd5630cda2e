"""One `edgeslim export` run, top to bottom: profile -> plan -> select -> factorize -> export -> validate -> report.

Outputs are atomic: everything is written into a hidden temporary folder beside the destination and moved into
place only when validation passed. A failed run's files go to `<out>.failed/` for inspection; an interrupted run
removes its temporary folder; in neither case is an earlier good output touched.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from exporter import plan as planner
from exporter.cache import TensorCache, flatten, tensor_key, unflatten
from exporter.calibration import calibration_batches
from exporter.contracts import Evaluation, RankPlan, RunResult, Spectrum, to_json
from exporter.errors import UsageError, ValidationFailed
from exporter.evaluate import evaluate
from exporter.export import export_model
from exporter.factorize import factorize_
from exporter.generate import OnnxDecoder, TorchDecoder
from exporter.grading import EvalTask, parse_eval_spec
from exporter.models import cache_dir, describe, load_model
from exporter.profile import load_profile
from exporter.quantize import fake_quantize_
from exporter.report import budget_checks, failure_lines, print_summary, write_report
from exporter.report_html import write_html
from exporter.select import SelectionMethod, get_method
from exporter.tasks import DEFAULT_TASK, Task, data_dir, get_task, sample
from exporter.validate import CPU, host_figures, measure_session, validate_parity

MAX_PROMPT_TOKENS = 64


@dataclass(frozen=True)
class RunConfig:
    device: str  # path of the device profile
    model: str | None = None  # None: the embedded default
    task: str = DEFAULT_TASK
    method: str = "svdllm"  # the best of the measured methods on SmolLM2 (README, "Selection methods")
    out: str | None = None  # None: ./edgeslim-out/<model>-<device>/
    rank_multiple: int = 8
    data_dir: str | None = None
    parity_prompts: int = 3
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    use_cache: bool = True  # per-layer SVDs in <cache dir>/tensors, so a rerun after an interruption resumes
    allocation: str = "uniform"  # or "global": ranks follow the method's basis scores across layers
    calibration_samples: int = 16  # windows of the task's calibration text, for methods that need data
    calibration_seq_len: int = 256
    evaluate: str | None = None  # "task:N": task metrics of dense, compressed and shipped models on N items
    max_new_tokens: int = 256  # per completion, for --eval


def run(config: RunConfig, console: Console | None = None) -> RunResult | None:
    """profile -> plan -> select -> factorize -> export -> validate -> report; raises ValidationFailed.

    Under `accelerate launch` / torchrun with several processes, every process takes part in relearning (basel)
    and only the main one goes on to export; the others return None."""
    console = console or Console(stderr=True)
    profile = load_profile(config.device)
    task, method, evaluation_tasks = _check_choices(config)
    torch.manual_seed(config.seed)

    with _progress(console) as progress:
        stage = progress.add_task("loading model", total=None)
        loaded = load_model(config.model, allow_pickle=config.allow_pickle,
                            trust_remote_code=config.trust_remote_code)
        destination = Path(config.out or f"edgeslim-out/{loaded.name}-{profile.name}")
        _check_destination(destination)
        prompts = [
            loaded.tokenizer(text, return_tensors="pt").input_ids[:, :MAX_PROMPT_TOKENS]
            for text in sample(task.prompts(data_dir(config.data_dir)), config.parity_prompts, config.seed)
        ]
        model, spec = loaded.model, describe(loaded.model)
        progress.update(stage, total=1, completed=1, description=f"loaded {loaded.name}")

        rank_plan, stats = _plan_and_collect(config, loaded, spec, profile, task, method, progress)
        if _helper_process():
            return None
        dense = copy.deepcopy(model) if evaluation_tasks else None  # the reference the compressed model is judged by
        spectra = _spectra(model, rank_plan, method, stats)
        stage = progress.add_task(f"selecting bases ({method.name})", total=len(rank_plan.factorized))
        with _single_thread():  # SVD on 2 threads of a busy machine can be 40x slower than on one
            layer_results = factorize_(model, rank_plan, method, stats, on_layer=lambda _: progress.advance(stage))

        with _staging(destination) as staging:
            stage = progress.add_task("exporting to ONNX", total=None)
            artifact = export_model(model, loaded.tokenizer, spec, staging, profile.precision,
                                    profile.context_length)
            progress.update(stage, total=1, completed=1)

            stage = progress.add_task("validating in onnxruntime", total=None)
            threads = min(profile.threads, os.cpu_count() or 1)
            parity, missing, quant_agreement = validate_parity(
                model, artifact, prompts, profile.execution_providers, threads
            )
            measurement = measure_session(artifact.model_file, "CPUExecutionProvider", threads,
                                          profile.prefill_tokens, profile.context_length)
            host = host_figures(threads)
            host_predicted = planner.predict_for_host(spec, rank_plan.layers, profile, host)
            progress.update(stage, total=1, completed=1)

            if artifact.reference_file != artifact.model_file:  # the fp32 reference was only for parity
                _remove_graph(Path(artifact.reference_file))
                artifact = replace(artifact, reference_file="(removed after validation)")
            evaluations = _evaluate(config, evaluation_tasks, dense, model, artifact, loaded.tokenizer, threads,
                                    progress) if evaluation_tasks else ()
            checks = budget_checks(profile, rank_plan, artifact, measurement)
            failures = failure_lines(parity, checks)
            result = RunResult(
                model=loaded.source, task=task.name, method=method.name, profile=profile, plan=rank_plan,
                layers=layer_results, artifact=replace(artifact, folder=str(destination)), parity=tuple(parity),
                providers_not_available=tuple(missing), quantization_top1_agreement=quant_agreement,
                measurement=measurement, host=host, host_predicted=host_predicted, checks=checks,
                passed=not failures, failures=failures, spectra=spectra, evaluations=evaluations,
            )
            (staging / "plan.json").write_text(to_json(rank_plan))
            write_report(result, staging)
            write_html(staging)
            _publish(staging, destination if result.passed else _failed(destination))

    print_summary(result, console)
    if not result.passed:
        raise ValidationFailed(f"{failures[0]} (full report in {_failed(destination)}/report.json)")
    return result


def _check_choices(config: RunConfig) -> tuple[Task, SelectionMethod, list[tuple[EvalTask, int]]]:
    """Every flag that can be checked before minutes of work."""
    task = get_task(config.task)
    evaluation_tasks = parse_eval_spec(config.evaluate) if config.evaluate else []
    if config.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {config.max_new_tokens}: must be a positive integer")
    if config.allocation not in ("uniform", "global"):
        raise UsageError(f"--allocation {config.allocation}: choose uniform or global")
    method = get_method(config.method, TensorCache(cache_dir() / "tensors" if config.use_cache else None))
    if method.needs == "training" and config.allocation == "global":
        raise UsageError(f"--method {method.name} prunes to planned ranks while training; use --allocation uniform")
    if config.out:
        _check_destination(Path(config.out))
    return task, method, evaluation_tasks


SPECTRUM_LAYERS = 3


def _spectra(model, rank_plan: RankPlan, method: SelectionMethod, stats: dict) -> tuple[Spectrum, ...]:
    """The method's basis scores for the first, a middle and the last factorized layer (report figures)."""
    layers = rank_plan.factorized
    if not layers:
        return ()
    picked = dict.fromkeys(layers[int(i * (len(layers) - 1) / (SPECTRUM_LAYERS - 1))] for i in range(SPECTRUM_LAYERS))
    spectra = []
    with _single_thread():
        for layer in picked:
            scores = method.scores(model.get_submodule(layer.name).weight.detach(), stats.get(layer.name)).double()
            total = float(scores.sum()) or 1.0
            spectra.append(Spectrum(layer.name, tuple(round(float(v) / total, 8) for v in scores), layer.rank))
    return tuple(spectra)


def _evaluate(config, evaluation_tasks, dense, model, artifact, tokenizer, threads, progress) -> tuple[Evaluation, ...]:
    """Dense (PyTorch), compressed (PyTorch, weights rounded as shipped) and shipped (onnxruntime) models on
    the same items of each task; the dense model is the reference for top-1 agreement and KL."""
    compressed = model if artifact.precision == "fp32" else fake_quantize_(copy.deepcopy(model), artifact.precision)
    reference = TorchDecoder(dense, "dense (PyTorch)")
    decoders = [
        TorchDecoder(compressed, "compressed (PyTorch)" if artifact.precision == "fp32"
                     else f"compressed, {artifact.precision}-rounded (PyTorch)"),
        OnnxDecoder.from_file(artifact.model_file, CPU, threads, f"shipped {artifact.precision} (onnxruntime)"),
    ]
    evaluations = []
    for task, limit in evaluation_tasks:
        items = task.items(data_dir(config.data_dir), limit, config.seed)
        stage = progress.add_task(f"evaluating {task.name} on {len(items)} items", total=3 * len(items))
        evaluations.append(evaluate(decoders, tokenizer, task, items, config.seed, config.max_new_tokens,
                                    reference=reference, advance=lambda stage=stage: progress.advance(stage)))
    return tuple(evaluations)


def _plan_and_collect(config, loaded, spec, profile, task, method, progress) -> tuple[RankPlan, dict]:
    """The rank plan and the statistics the method selects with; global allocation plans from the method's
    scores, so it collects on every projection first."""
    rank_plan = planner.make_plan(spec, profile, config.rank_multiple)  # dense when the budget allows
    if not rank_plan.factorized:
        return rank_plan, {}
    names = [layer.name for layer in (spec.layers if config.allocation == "global" else rank_plan.factorized)]
    stats = {}
    if method.needs != "nothing":
        calibration = calibration_batches(loaded.tokenizer, task.calibration(data_dir(config.data_dir)),
                                          config.calibration_samples, config.calibration_seq_len, config.seed)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        where = f" on {processes} processes" if processes > 1 and method.needs == "training" else ""
        stage = progress.add_task(f"collecting {method.needs} ({calibration.tokens} tokens of {task.name}){where}",
                                  total=method.passes * len(calibration.batches))
        ranks = {layer.name: layer.rank for layer in rank_plan.factorized}
        pruned_to = repr(ranks) if method.needs == "training" else ""  # only training prunes to the ranks
        key = tensor_key("stats", method.name, loaded.fingerprint, calibration.fingerprint, repr(names), pruned_to)
        stats = unflatten(method.cache.get_or_compute(key, lambda: flatten(
            method.collect(loaded.model, calibration, names, lambda: progress.advance(stage), ranks))))
    if config.allocation == "global":
        stage = progress.add_task("scoring bases for allocation", total=len(names))
        scores = {}
        with _single_thread():
            for name in names:
                scores[name] = method.scores(loaded.model.get_submodule(name).weight.detach(), stats.get(name))
                progress.advance(stage)
        rank_plan = planner.allocate(spec, profile, scores, config.rank_multiple)
    return rank_plan, stats


def _helper_process() -> bool:
    """True in the secondary processes of a multi-process launch (they only share the relearning)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate import PartialState

    return not PartialState(cpu=not torch.cuda.is_available()).is_main_process


def _failed(destination: Path) -> Path:
    return destination.with_name(destination.name + ".failed")


def _check_destination(destination: Path) -> None:
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"--out {destination}: is a file; choose a folder path")
    parent = destination.parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--out {destination}: {existing} is not a writable folder; choose another --out")


@contextmanager
def _staging(destination: Path):
    """A temporary folder beside the destination, removed unless it was published."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, destination: Path) -> None:
    """Swap the finished folder into place; the old one is only removed once the new one is there."""
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, old)
    os.replace(staging, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_graph(path: Path) -> None:
    path.unlink()
    path.with_name(path.name + ".data").unlink(missing_ok=True)


@contextmanager
def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def _progress(console: Console):
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        yield progress
