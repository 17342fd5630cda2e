"""One `edgeslim export` run, top to bottom: profile -> calibrate -> plan -> select -> factorize -> quantize ->
export -> validate -> quality -> report. A model that does not fit in memory goes through select ... export a
decoder block at a time (`_build_streamed`, exporter.stream).

Outputs are atomic (exporter.output): everything is written into a hidden temporary folder beside the destination
and moved into place at the end; a failed run's files go to `<out>.failed/`, an interrupted run's are removed.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from exporter import plan as planner
from exporter.cache import TensorCache, flatten, unflatten
from exporter.calibration import Calibration, calibration_batches
from exporter.checkpoint import hand_back_freed_memory
from exporter.collect import cached_activation_stats
from exporter.contracts import (
    MIB,
    DeviceProfile,
    Evaluation,
    LayerPlan,
    LayerResult,
    Measurement,
    ModelSpec,
    OnnxArtifact,
    ParityResult,
    RankPlan,
    RunResult,
    Spectrum,
    to_json,
)
from exporter.errors import UsageError, ValidationFailed
from exporter.evaluate import evaluate
from exporter.export import export_model
from exporter.factorize import factorize_, layer_spectrum, spectrum_layers
from exporter.footprint import RssSampler, choose_streaming
from exporter.generate import OnnxDecoder, TorchDecoder
from exporter.grading import EvalTask, parse_eval_spec
from exporter.graph import GraphOptions
from exporter.mobile import package as package_ort
from exporter.models import LoadedModel, cache_dir, describe, lm_head_name, load_model
from exporter.output import Staging, check_destination, failed_path
from exporter.profile import load_profile
from exporter.providers import assess_file
from exporter.quality import heldout_tokens, measure_quality, reference_graph, torch_nll
from exporter.quantize import apply_, quantize_model
from exporter.report import (
    budget_checks,
    failure_lines,
    ort_failures,
    print_summary,
    tokenizer_failures,
    write_report,
)
from exporter.report_html import write_html
from exporter.runtime_tokenizer import check_runtime_tokenizer
from exporter.select import SelectionMethod, get_method, single_thread
from exporter.sensitivity import layer_costs, output_fisher, streamed_costs
from exporter.stream import StreamInputs, relearn_share, stream_export
from exporter.tasks import DEFAULT_TASK, Task, data_dir, get_task, sample
from exporter.validate import CPU, GREEDY_STEPS, host_figures, measure_session, validate_parity, validate_positions
from exporter.vocabulary import prune_vocabulary_, token_ranking, vocabulary_costs

MAX_PROMPT_TOKENS = 64
T = TypeVar("T")
MEMORY_ATTEMPTS = 2  # a plan whose measured memory misses the budget is made again, once, below the miss
QUALITY_WINDOW = 512  # tokens per held-out scoring window (at most the profile's context)


@dataclass(frozen=True)
class RunConfig:
    device: str  # path of the device profile
    model: str | None = None  # None: the embedded default
    task: str = DEFAULT_TASK
    method: str = "svdllm"  # the best of the measured methods on SmolLM2 (README, "Selection methods")
    out: str | None = None  # None: ./edgeslim-out/<model>-<device>/
    rank_multiple: int | None = None  # None: the precision's (32 at int4: MatMulNBits blocks; 8 at fp32)
    data_dir: str | None = None
    parity_prompts: int = 3
    seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    use_cache: bool = True  # per-layer SVDs in <cache dir>/tensors, so a rerun after an interruption resumes
    allocation: str = "sensitivity"  # or "uniform": one keep ratio for every layer (the published baselines')
    calibration_samples: int = 16  # windows of the task's calibration text, for methods that need data
    calibration_seq_len: int = 256
    evaluate: str | None = None  # "task:N": task metrics of dense, compressed and shipped models on N items
    max_new_tokens: int = 256  # per completion, for --eval
    max_ppl_ratio: float | None = None  # quality gate; None: the profile's (default 1.25)
    quality_tokens: int = 2048  # held-out tokens the quality of what ships is measured on
    ort: bool = False  # also ship model.ort and its operator config for a minimal mobile runtime (exporter.mobile)
    streaming: bool | None = None  # a block at a time (exporter.stream); None: when the model would not fit otherwise


def run(config: RunConfig, console: Console | None = None) -> RunResult | None:
    """profile -> calibrate -> plan -> select -> factorize -> quantize -> export -> validate -> quality -> report;
    raises ValidationFailed.

    Under `accelerate launch` / torchrun with several processes, every process takes part in relearning (basel,
    basel-layerwise) and only the main one goes on to export; the others return None."""
    console = console or Console(stderr=True)
    hand_back_freed_memory()
    profile = load_profile(config.device)
    if config.max_ppl_ratio is not None:
        profile = replace(profile, max_ppl_ratio=config.max_ppl_ratio)
    task, method, evaluation_tasks = _check_choices(config)
    torch.manual_seed(config.seed)

    streamed = _streamed(config, profile, method, console)
    with _progress(console) as progress, RssSampler() as rss:
        stage = progress.add_task("loading model" + (" (layer streaming)" if streamed else ""), total=None)
        loaded = load_model(config.model, allow_pickle=config.allow_pickle,
                            trust_remote_code=config.trust_remote_code, streamed=streamed)
        destination = Path(config.out or f"edgeslim-out/{loaded.name}-{profile.name}")
        check_destination(destination)
        prompt_tokens = max(1, min(MAX_PROMPT_TOKENS, profile.context_length - GREEDY_STEPS))  # + greedy steps
        prompts = [
            loaded.tokenizer(text, return_tensors="pt").input_ids[:, :prompt_tokens]
            for text in sample(task.prompts(data_dir(config.data_dir)), config.parity_prompts, config.seed)
        ]
        heldout = heldout_tokens(task, loaded.tokenizer, data_dir(config.data_dir), config.quality_tokens)
        spec = describe(loaded.model)
        progress.update(stage, total=1, completed=1, description=f"loaded {loaded.name}")
        data = TaskData(config, loaded, spec, task, method, progress)
        threads = min(profile.threads, os.cpu_count() or 1)
        window = min(QUALITY_WINDOW, profile.context_length)

        with Staging(destination) as output:
            staging = output.folder
            planning = profile  # what the plan aims at: the profile, tightened if memory was underestimated
            for attempt in range(MEMORY_ATTEMPTS):
                rank_plan = _plan(config, loaded, spec, planning, data, method, progress)
                if streamed and _helper_process():
                    _share_streamed_relearning(loaded, spec, rank_plan, method, data.calibration, progress)
                    return None
                if streamed:
                    built = _build_streamed(loaded, spec, profile, rank_plan, method,
                                            StreamInputs(data.calibration, heldout, window, prompts), threads,
                                            staging, progress)
                else:
                    stats = _method_stats(config, loaded, rank_plan, data, method, progress)
                    if _helper_process():
                        return None
                    built = _build(loaded, spec, profile, rank_plan, method, stats, data, prompts, threads, staging,
                                   progress)
                peak = built.measurement.peak_memory_bytes
                if peak <= profile.memory_budget_bytes or attempt + 1 == MEMORY_ATTEMPTS:
                    break
                predicted = rank_plan.predicted.memory_bytes
                planning = replace(planning, memory_budget_mib=planning.memory_budget_mib * predicted / peak)
                console.print(f"measured peak memory {peak / MIB:.1f} MiB > budget {profile.memory_budget_mib:g} "
                              f"MiB (predicted {predicted / MIB:.1f}): planning again with the prediction's error "
                              "taken off the budget")
                output.empty()
            artifact, measurement = built.artifact, built.measurement
            host = host_figures(threads)
            host_predicted = planner.predict_for_host(spec, rank_plan, profile, host)

            stage = progress.add_task(f"quality on {len(heldout)} held-out {task.name} tokens", total=None)
            if built.quality_reference:  # made by the streamed pass
                reference, dense_nll = built.quality_reference
            else:
                reference = reference_graph(loaded.model, spec, profile.precision, rank_plan.activations,
                                            profile.kv_cache_precision, window, staging / "quality-reference")
                dense_nll = torch_nll(loaded.model, heldout, window)
            quality = measure_quality(task.name, heldout, artifact.all_positions_file, str(reference), dense_nll,
                                      threads, profile.max_ppl_ratio, window)
            shutil.rmtree(staging / "quality-reference")
            progress.update(stage, total=1, completed=1)

            evaluations = _evaluate(config, evaluation_tasks, loaded.model, built.mirror, artifact, loaded.tokenizer,
                                    threads, progress) if evaluation_tasks else ()
            artifact = _remove_validation_graphs(artifact)
            ort_package = _stage(progress, "packaging in the ORT format", None, lambda _: package_ort(
                Path(artifact.model_file), staging, threads)) if config.ort else None
            heldout_texts = [prompt + answer for prompt, answer in task.heldout(data_dir(config.data_dir))]
            tokenizer = check_runtime_tokenizer(staging, loaded.tokenizer, heldout_texts)
            checks = budget_checks(profile, rank_plan, artifact, measurement)
            failures = (failure_lines(built.parity, checks, quality, rank_plan) + ort_failures(ort_package, profile)
                        + tokenizer_failures(tokenizer))
            result = RunResult(
                model=loaded.source, task=task.name, method=method.name, profile=profile, plan=rank_plan,
                layers=built.layers, artifact=replace(artifact, folder=str(destination)), parity=tuple(built.parity),
                providers_not_available=tuple(built.missing), quantization_top1_agreement=built.agreement,
                measurement=measurement, host=host, host_predicted=host_predicted, checks=checks,
                passed=not failures, failures=failures, spectra=built.spectra, evaluations=evaluations,
                quality=quality, stage_seconds=_stage_seconds(progress), stage_peak_mib=_stage_peaks(progress, rss),
                providers=assess_file(artifact.model_file, profile.execution_providers), ort_package=ort_package,
                tokenizer=tokenizer,
            )
            (staging / "plan.json").write_text(to_json(rank_plan))
            write_report(result, staging)
            write_html(staging)
            output.publish(destination if result.passed else failed_path(destination))

    print_summary(result, console)
    if not result.passed:
        raise ValidationFailed(f"{failures[0]} (full report in {failed_path(destination)}/report.json)")
    return result


@dataclass
class _Built:
    """One plan carried out: the compressed model, its export in the staging folder, and what validation found."""

    mirror: torch.nn.Module | None  # the compressed model holding exactly the shipped weights (None: streamed)
    layers: tuple[LayerResult, ...]
    spectra: tuple[Spectrum, ...]
    artifact: OnnxArtifact
    parity: list[ParityResult]
    missing: list[str]
    agreement: float | None
    measurement: Measurement
    quality_reference: tuple[Path, float] | None = None  # streamed: the reference graph and the dense fp32 NLL


def _build(loaded, spec, profile, rank_plan, method, stats, data, prompts, threads, staging, progress) -> _Built:
    """select -> factorize -> quantize -> export -> validate parity -> measure, on a copy of the dense model."""
    # loaded.model stays dense: the reference what ships is judged by; a dense plan changes no weight, so needs no copy
    compresses = bool(rank_plan.factorized or rank_plan.vocabulary)
    model = copy.deepcopy(loaded.model) if compresses else loaded.model
    spectra = _spectra(model, rank_plan, method, stats)
    with single_thread():
        layers = ()
        if rank_plan.factorized:
            stage = progress.add_task(f"selecting bases ({method.name})", total=len(rank_plan.factorized))
            layers = factorize_(model, rank_plan, method, stats, on_layer=lambda _: progress.advance(stage))
        if rank_plan.vocabulary:
            prune_vocabulary_(model, data.vocabulary_ranking[:rank_plan.vocabulary])
        quantized = None
        if profile.precision == "int4":
            quantized = _stage(progress, "rounding to int4 (GPTQ)", None,
                               lambda _: quantize_model(model, data.activations))
    mirror = model if quantized is None else apply_(copy.deepcopy(model), quantized)

    artifact = _stage(progress, "building the ONNX graph", None, lambda _: export_model(
        model, loaded.tokenizer, spec, staging, profile.precision, profile.context_length, quantized,
        rank_plan.activations, profile.kv_cache_precision))
    parity, missing, agreement = _stage(progress, "validating in onnxruntime", None, lambda _: validate_parity(
        model, mirror, artifact, prompts, profile.execution_providers, threads))
    measurement = _measure(artifact, profile, prompts, threads, progress)
    return _Built(mirror, layers, spectra, artifact, parity, missing, agreement, measurement)


def _build_streamed(loaded, spec, profile, rank_plan, method, inputs: StreamInputs, threads, staging,
                    progress) -> _Built:
    """`_build` a block at a time (exporter.stream): select, factorize, quantize and export in one pass over the
    checkpoint; parity on every prompt position."""
    stage = progress.add_task(f"compressing and exporting block by block ({method.name}){_on_processes(method)}",
                              total=spec.num_layers)
    options = GraphOptions(profile.context_length, rank_plan.activations, profile.kv_cache_precision)
    skeleton = copy.deepcopy(loaded.model)  # factorizing replaces its modules; a second plan needs the checkpoint's
    streamed = stream_export(loaded.checkpoint, skeleton, loaded.tokenizer, spec, options, profile.precision,
                             rank_plan, method, inputs, staging, lambda: progress.advance(stage))
    artifact = streamed.artifact
    parity, missing, agreement = _stage(progress, "validating in onnxruntime", None, lambda _: validate_positions(
        artifact, inputs.prompts, streamed.compressed_logits, streamed.mirror_logits, profile.execution_providers,
        threads))
    measurement = _measure(artifact, profile, inputs.prompts, threads, progress)
    return _Built(None, streamed.layers, streamed.spectra, artifact, parity, missing, agreement, measurement,
                  (streamed.reference_file, streamed.dense_nll))


def _share_streamed_relearning(loaded, spec, rank_plan, method, calibration, progress) -> None:
    """A secondary process of a multi-process launch, streaming: its share of each block's relearning (nothing
    to do for a method that does not train)."""
    if method.needs == "blocks":
        stage = progress.add_task(f"relearning a share of each block ({method.name})", total=spec.num_layers)
        relearn_share(loaded.checkpoint, loaded.model, spec, rank_plan, method, calibration,
                      lambda: progress.advance(stage))


def _measure(artifact: OnnxArtifact, profile, prompts, threads: int, progress) -> Measurement:
    """Latency and peak memory of the shipped graph in a fresh process, and the reference outputs a device's
    kernels must reproduce (bench_on_device)."""
    stage = progress.add_task("measuring latency and peak memory", total=None)
    measurement = measure_session(artifact.model_file, "CPUExecutionProvider", threads, profile.prefill_tokens,
                                  profile.context_length, prompts[0][0].tolist())
    progress.update(stage, total=1, completed=1)
    return measurement


def _streamed(config: RunConfig, profile: DeviceProfile, method: SelectionMethod, console: Console) -> bool:
    """Whether to export a block at a time: asked for, or (unasked) when only that fits this machine; what it
    cannot do is refused here, before anything is loaded."""
    folder = Path(config.model or "").expanduser()
    relearning = method.needs == "blocks"
    if relearning and config.streaming is False:
        raise UsageError(f"--method {method.name} relearns a block at a time, which is layer streaming: drop "
                         "--in-memory, or choose basel to relearn through the whole model")
    requested = True if relearning else config.streaming
    if relearning and config.streaming is None:
        console.print(f"--method {method.name}: exporting a block at a time")
    streamed = bool(requested)
    if config.model and (folder / "config.json").is_file():
        streamed, note = choose_streaming(folder, config.model, config.trust_remote_code, requested, relearning,
                                          profile)
        if note:
            console.print(note)
    if streamed and method.needs not in ("nothing", "activations", "blocks"):
        raise UsageError(f"--method {method.name} needs {method.needs} through the whole model, which layer "
                         "streaming never holds; choose svdllm, svd or basel-layerwise")
    if streamed and config.evaluate:
        raise UsageError("--eval runs the whole PyTorch model, which layer streaming never holds; drop --eval "
                         "or --layer-streaming")
    return streamed


def _check_choices(config: RunConfig) -> tuple[Task, SelectionMethod, list[tuple[EvalTask, int]]]:
    """Every flag that can be checked before minutes of work."""
    task = get_task(config.task)
    evaluation_tasks = parse_eval_spec(config.evaluate) if config.evaluate else []
    if config.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {config.max_new_tokens}: must be a positive integer")
    if config.allocation not in ("sensitivity", "uniform"):
        raise UsageError(f"--allocation {config.allocation}: choose sensitivity or uniform")
    if config.max_ppl_ratio is not None and not 0 < config.max_ppl_ratio < float("inf"):
        raise UsageError(f"--max-ppl-ratio {config.max_ppl_ratio}: must be a positive number, e.g. 1.25")
    if config.quality_tokens < 16:
        raise UsageError(f"--quality-tokens {config.quality_tokens}: must be at least 16")
    method = get_method(config.method, TensorCache(cache_dir() / "tensors" if config.use_cache else None))
    if config.out:
        check_destination(Path(config.out))
    return task, method, evaluation_tasks


def _spectra(model, rank_plan: RankPlan, method: SelectionMethod, stats: dict) -> tuple[Spectrum, ...]:
    """The method's basis scores for the first, a middle and the last factorized layer (report figures)."""
    picked = spectrum_layers(rank_plan)
    with single_thread():
        return tuple(layer_spectrum(layer, model, method, stats) for layer in rank_plan.factorized if layer in picked)


def _evaluate(config, evaluation_tasks, dense, mirror, artifact, tokenizer, threads,
              progress) -> tuple[Evaluation, ...]:
    """Dense (PyTorch), compressed (PyTorch, holding the shipped weights) and shipped (onnxruntime) models on the
    same items of each task; the dense model is the reference for top-1 agreement and KL."""
    shipped = OnnxDecoder.from_file(artifact.model_file, CPU, threads, f"shipped {artifact.precision} (onnxruntime)")
    context = shipped.max_length  # every model sees the same (possibly shortened) prompts
    reference = TorchDecoder(dense, "dense (PyTorch)", context)
    compressed = TorchDecoder(mirror, "compressed (PyTorch)" if artifact.precision == "fp32"
                              else f"compressed, {artifact.precision}-rounded (PyTorch)", context)
    decoders = [compressed, shipped]
    evaluations = []
    for task, limit in evaluation_tasks:
        items = task.items(data_dir(config.data_dir), limit, config.seed)
        stage = progress.add_task(f"evaluating {task.name} on {len(items)} items", total=3 * len(items))
        evaluations.append(evaluate(decoders, tokenizer, task, items, config.seed, config.max_new_tokens,
                                    reference=reference, advance=lambda stage=stage: progress.advance(stage)))
    return tuple(evaluations)


class TaskData:
    """The target task's calibration data and the statistics collected from it, each made on first use (a plan
    that ships the dense model at fp32 needs none of it)."""

    def __init__(self, config: RunConfig, loaded: LoadedModel, spec: ModelSpec, task: Task,
                 method: SelectionMethod, progress):
        self.config, self.loaded, self.spec, self.task, self.method, self.progress = (config, loaded, spec, task,
                                                                                     method, progress)

    @cached_property
    def calibration(self) -> Calibration:
        c = self.config
        return calibration_batches(self.loaded.tokenizer, self.task.calibration(data_dir(c.data_dir)),
                                   c.calibration_samples, c.calibration_seq_len, c.seed)

    @cached_property
    def activations(self) -> dict:
        """Input Gram matrices (and mean |x|) of every projection and of the lm_head on the calibration data: what
        GPTQ rounds with, what the planner prices layers with and what activation-aware methods select with."""
        names = [layer.name for layer in self.spec.layers] + [lm_head_name(self.loaded.model)]
        calibration = self.calibration
        return _stage(self.progress, f"collecting activations ({calibration.tokens} tokens of {self.task.name})",
                      len(calibration.batches), lambda advance: cached_activation_stats(
                          self.loaded.model, self.loaded.fingerprint, calibration, names, self.method.cache, advance))

    @cached_property
    def vocabulary_ranking(self) -> list[int]:
        """Token ids in the order the vocabulary's rows are kept (counted on the even-indexed calibration texts)."""
        texts = self.task.calibration(data_dir(self.config.data_dir))[::2]
        return token_ranking(self.loaded.tokenizer, texts, self.spec.vocab_size)

    def vocabulary_costs(self) -> dict[int, float]:
        """The measured loss increase of keeping fewer vocabulary rows (exporter.vocabulary), cached."""
        texts = self.task.calibration(data_dir(self.config.data_dir))
        key = ("vocabulary", self.loaded.fingerprint, self.calibration.fingerprint, repr(self.vocabulary_ranking[:64]))

        def measure() -> dict[str, torch.Tensor]:
            measured = vocabulary_costs(self.loaded.model, self.loaded.tokenizer, texts, self.config.seed,
                                        self.vocabulary_ranking)
            return {str(count): torch.tensor(cost) for count, cost in measured.items()}

        costs = _stage(self.progress, "measuring what fewer vocabulary rows cost", None,
                       lambda _: self.method.cache.get_or_compute(key, measure))
        return {int(count): float(cost) for count, cost in costs.items()}

    def fisher(self) -> dict[str, torch.Tensor]:
        """Mean squared gradients of the per-token loss at every projection's outputs (exporter.sensitivity)."""
        names = [layer.name for layer in self.spec.layers]
        calibration = self.calibration
        key = ("fisher", self.loaded.fingerprint, calibration.fingerprint, repr(names))
        return _stage(self.progress, "measuring layer sensitivity", len(calibration.batches),
                      lambda advance: self.method.cache.get_or_compute(key, lambda: output_fisher(
                          self.loaded.model, calibration, names, advance)))

    def streamed_costs(self, ranks: Callable[[LayerPlan], list[int]], precision: str) -> dict[str, dict[int, float]]:
        """Every layer's `layer_costs`, priced a block at a time (exporter.sensitivity.streamed_costs), cached."""
        calibration, loaded = self.calibration, self.loaded
        options = {layer.name: ranks(layer) for layer in self.spec.layers}
        key = ("streamed-costs", loaded.fingerprint, calibration.fingerprint, precision, repr(options))

        def price(advance: Callable[[], None]) -> dict[str, torch.Tensor]:
            costs = streamed_costs(loaded.checkpoint, loaded.model, self.spec, calibration, ranks,
                                   precision, self.method.cache, advance)
            return flatten({layer: {str(rank): torch.tensor(cost, dtype=torch.float64)
                                    for rank, cost in by_rank.items()} for layer, by_rank in costs.items()})

        flat = _stage(self.progress, "measuring layer sensitivity block by block (forward, then backward)",
                      2 * self.spec.num_layers, lambda advance: self.method.cache.get_or_compute(
                          key, lambda: price(advance)))
        return {layer: {int(rank): float(cost) for rank, cost in by_rank.items()}
                for layer, by_rank in unflatten(flat).items()}


def plan_only(config: RunConfig, console: Console | None = None) -> tuple[LoadedModel, RankPlan]:
    """What `edgeslim plan` prints: the plan `run` would make, compressing nothing."""
    console = console or Console(stderr=True)
    hand_back_freed_memory()
    profile = load_profile(config.device)
    task, method, _ = _check_choices(config)
    streamed = _streamed(config, profile, method, console)
    with _progress(console) as progress:
        loaded = load_model(config.model, allow_pickle=config.allow_pickle,
                            trust_remote_code=config.trust_remote_code, streamed=streamed)
        spec = describe(loaded.model)
        return loaded, _plan(config, loaded, spec, profile, TaskData(config, loaded, spec, task, method, progress),
                             method, progress)


def _plan(config, loaded, spec, profile, data: TaskData, method, progress) -> RankPlan:
    """The dense model when it fits; else the least estimated loss that fits (or one keep ratio: uniform). A model
    streamed a block at a time is priced a block at a time, and keeps every vocabulary row (pricing fewer needs
    the whole model)."""
    rank_plan = planner.make_plan(spec, profile, config.rank_multiple)
    if rank_plan.allocation == "dense" or config.allocation == "uniform":
        return rank_plan
    multiple = config.rank_multiple or planner.default_rank_multiple(profile.precision)

    def ranks(layer: LayerPlan) -> list[int]:
        return planner.rank_options(layer.d_in, layer.d_out, multiple)

    if loaded.checkpoint:
        return planner.allocate(spec, profile, data.streamed_costs(ranks, profile.precision), config.rank_multiple)
    fisher = data.fisher()
    stage = progress.add_task("pricing each layer's ranks", total=len(spec.layers))
    costs = {}
    with single_thread():
        for layer in spec.layers:
            weight = loaded.model.get_submodule(layer.name).weight
            costs[layer.name] = layer_costs(weight, data.activations[layer.name]["gram"], fisher[layer.name],
                                            ranks(layer), profile.precision, layer.name, method.cache)
            progress.advance(stage)
    return planner.allocate(spec, profile, costs, config.rank_multiple, data.vocabulary_costs())


def _method_stats(config, loaded, rank_plan, data: TaskData, method, progress) -> dict:
    """The statistics the method selects bases with, for the layers the plan factorizes."""
    if not rank_plan.factorized or method.needs == "nothing":
        return {}
    if method.needs == "activations":
        return data.activations
    calibration = data.calibration
    names = [layer.name for layer in rank_plan.factorized]
    where = _on_processes(method)
    ranks = {layer.name: layer.rank for layer in rank_plan.factorized}
    pruned_to = repr(ranks) if method.needs == "training" else ""  # only training prunes to the ranks
    key = ("stats", method.name, loaded.fingerprint, calibration.fingerprint, repr(names), pruned_to)
    return unflatten(_stage(progress, f"collecting {method.needs} ({calibration.tokens} tokens){where}",
                            method.passes * len(calibration.batches),
                            lambda advance: method.cache.get_or_compute(key, lambda: flatten(
                                method.collect(loaded.model, calibration, names, advance, ranks)))))


def _remove_validation_graphs(artifact: OnnxArtifact) -> OnnxArtifact:
    """The graphs only validation needed (exporter.export) leave the folder before it is published."""
    removed = "(removed after validation)"
    for path in {artifact.reference_file, artifact.exact_file, artifact.all_positions_file} - {artifact.model_file}:
        Path(path).unlink()
        Path(path).with_name(Path(path).name + ".data").unlink(missing_ok=True)  # variants read the shipped file
    return replace(artifact, reference_file=removed, exact_file=removed, all_positions_file=removed)


def _on_processes(method: SelectionMethod) -> str:
    """' on N processes' when a multi-process launch shares the method's relearning, else ''."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return f" on {processes} processes" if processes > 1 and method.needs in ("training", "blocks") else ""


def _helper_process() -> bool:
    """True in the secondary processes of a multi-process launch (they only share the relearning)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from accelerate import PartialState

    return not PartialState(cpu=not torch.cuda.is_available()).is_main_process



def _stage(progress: Progress, description: str, total: int | None, work: Callable[[Callable[[], None]], T]) -> T:
    """`work(advance)` as one stage of the progress display, marked done after it, also when a cache answered at
    once (report.json's stage_seconds reads when each stage finished)."""
    stage = progress.add_task(description, total=total)
    result = work(lambda: progress.advance(stage))
    progress.update(stage, total=total or 1, completed=total or 1)
    return result


def _stage_seconds(progress: Progress) -> dict[str, float]:
    """Wall time of each stage, for report.json; a stage run twice (a second plan) counts both times."""
    seconds: dict[str, float] = {}
    for task in progress.tasks:
        seconds[task.description] = round(seconds.get(task.description, 0.0) + _took(task), 2)
    return seconds


def _stage_peaks(progress: Progress, rss: RssSampler) -> dict[str, float]:
    """Peak resident MiB of this process during each stage (report.json): where a run's memory goes."""
    peaks: dict[str, float] = {}
    for task in progress.tasks:
        peak = rss.peak_between(task.start_time or 0.0, (task.start_time or 0.0) + _took(task))
        if peak is not None:
            peaks[task.description] = round(max(peaks.get(task.description, 0.0), peak / MIB), 1)
    return peaks


def _took(task) -> float:
    return (task.finished_time if task.finished else task.elapsed) or 0.0


@contextmanager
def _progress(console: Console):
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        yield progress
