"""The data that flows between stages, in one place so the whole contract reads in one sitting.

Every object is a frozen dataclass of plain values (no tensors, no models): stages never mutate their input,
and `to_json` records exactly what ran in `plan.json` and `report.json`. The model is the only mutable object
in a run, and the one function that changes it says so (`factorize.factorize_`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceProfile:
    """What the target device offers and what an app may spend there (see device_profiles/README.md)."""

    name: str
    description: str
    execution_providers: tuple[str, ...]  # in order of preference; CPUExecutionProvider is always the fallback
    threads: int
    precision: str  # weight precision of the shipped graph: fp32 | int4
    context_length: int  # tokens of KV cache the app reserves
    memory_budget_mib: float  # resident: weights + KV cache at context_length + runtime workspace
    decode_ms_per_token: float  # budget for one generated token, after a prompt of prefill_tokens
    prefill_ms: float  # budget for processing a prompt of prefill_tokens
    prefill_tokens: int
    memory_bandwidth_gbps: float  # effective (measured, not datasheet peak) DRAM bandwidth, GB/s
    compute_gflops: float  # effective matmul throughput of the inference engine, GFLOP/s
    op_overhead_us: float = 5.0  # the runtime's cost per graph node beyond the roofline (dispatch, small ops), µs
    max_ppl_ratio: float = 1.25  # quality gate: held-out perplexity of what ships / the dense model's, same precision
    kv_cache_precision: str = "fp32"  # or "fp16": half the KV cache's memory

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mib * MIB)


@dataclass(frozen=True)
class LayerSpec:
    """One compressible projection: `name` is its module path, shapes as y = W x with W (d_out x d_in)."""

    name: str
    d_in: int
    d_out: int
    bias: bool

    @property
    def params(self) -> int:
        return self.d_in * self.d_out

    @property
    def break_even_rank(self) -> float:
        """Rank at which two factors hold as many weights as the dense matrix: d_in*d_out/(d_in+d_out)."""
        return self.d_in * self.d_out / (self.d_in + self.d_out)


@dataclass(frozen=True)
class ModelSpec:
    """What the planner and exporter need to know about a model, read from its config and modules."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    max_positions: int | None  # longest sequence the model's position encoding supports, when it says
    layers: tuple[LayerSpec, ...]  # compressible projections of the decoder blocks
    embedding_params: int  # token (and position) embeddings: a lookup, one row read per token
    lm_head_params: int  # the output projection (shares the embedding's storage when tied)
    other_params: int  # norms and everything else kept in fp32
    activation: str = "silu"  # the MLP's: "silu" or "gelu" (graph node counts differ)
    logit_softcap: bool = False  # Gemma 2: logits soft-capped after the lm_head


@dataclass(frozen=True)
class LayerPlan:
    """One layer's decision: `rank` None means the layer stays dense."""

    name: str
    d_in: int
    d_out: int
    rank: int | None

    @property
    def dense(self) -> bool:
        return self.rank is None

    @property
    def params(self) -> int:
        return self.d_in * self.d_out if self.rank is None else self.rank * (self.d_in + self.d_out)


@dataclass(frozen=True)
class LatencyTerms:
    """What a plan's latency is made of on any machine: bytes moved, FLOPs (divided by how fast the compute mode
    runs relative to int8) and graph nodes. A machine's bandwidth, compute and per-node overhead turn them into
    milliseconds (exporter.plan.latency_ms); stored in plan.json, so latencies measured on a device can calibrate
    its profile (`edgeslim calibrate`)."""

    prefill_bytes: float
    prefill_flops: float
    decode_bytes: float
    decode_flops: float
    nodes: int


@dataclass(frozen=True)
class Prediction:
    """What the latency/memory model predicts for a plan on one machine (the device, or this host)."""

    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    memory_bytes: int
    prefill_ms: float
    decode_ms_per_token: float
    latency_terms: LatencyTerms | None = None


@dataclass(frozen=True)
class RankPlan:
    """Per-layer ranks that meet the budget, with the figures predicted for the device."""

    device: str
    precision: str
    keep_ratio: float  # fraction of the decoder projections' dense weights kept
    rank_multiple: int
    layers: tuple[LayerPlan, ...]
    predicted: Prediction
    dense_predicted: Prediction  # the same model uncompressed, for comparison
    allocation: str = "uniform"  # "dense" (it fits), "sensitivity" (least estimated loss) or "uniform" (one ratio)
    estimated_loss_increase: float | None = None  # nats per token, summed over layers (exporter.sensitivity)
    activations: str = "int8"  # what int4 matmuls compute with: "int8" (faster) or "fp32" (less resident memory)
    vocabulary: int | None = None  # vocabulary rows kept (the rest share one row); None: all

    @property
    def factorized(self) -> tuple[LayerPlan, ...]:
        return tuple(layer for layer in self.layers if not layer.dense)


@dataclass(frozen=True)
class LayerResult:
    """What factorizing one layer did: relative Frobenius error of the kept bases."""

    name: str
    rank: int
    full_rank: int
    relative_error: float


@dataclass(frozen=True)
class OnnxArtifact:
    """The exported model folder and the graphs in it."""

    folder: str
    model_file: str  # the shipped graph, at the profile's precision
    reference_file: str  # the fp32 graph that parity against PyTorch is checked on
    exact_file: str  # the shipped weights computed exactly (fp32 activations), for parity of the int4 weights
    all_positions_file: str  # the shipped graph with every position's logits, for held-out perplexity
    precision: str
    file_bytes: int  # model file plus its external data, as shipped
    nodes: int  # of the shipped graph
    opset: int


@dataclass(frozen=True)
class ParityResult:
    provider: str
    graph: str  # "reference fp32" or "shipped int4" ...
    prompts: int
    max_abs_logit_diff: float
    tolerance: float
    greedy_steps: int
    greedy_identical: bool
    greedy_match_fraction: float  # tokens before the first difference / all greedy tokens
    passed: bool
    gated: bool = True  # False: reported only (the shipped graph's int8 activations: accuracy, judged by quality)


@dataclass(frozen=True)
class Measurement:
    """Figures measured here by running the shipped graph in a fresh onnxruntime process."""

    provider: str
    threads: int
    prefill_tokens: int
    prefill_ms: float  # median
    decode_ms_per_token: float  # median
    peak_memory_bytes: int  # peak resident set of the process above its baseline before loading
    load_ms: float


@dataclass(frozen=True)
class ProviderFit:
    """How much of the shipped graph one execution provider could run, by operator type (exporter.providers)."""

    provider: str
    installed: bool  # offered by the onnxruntime installed here
    known: bool  # False: edgeslim has no operator list for this provider
    nodes: int
    supported_nodes: int
    partitions: int  # connected groups of supported nodes: each one is a hand-over to and from the CPU
    unsupported_operators: tuple[str, ...]
    summary: str


@dataclass(frozen=True)
class OrtPackage:
    """`export --ort`: the shipped graph in onnxruntime's ORT format, as run in a fresh process (exporter.mobile)."""

    model_file: str
    operators_file: str  # for onnxruntime's build.py --minimal_build --include_ops_by_config
    model_bytes: int
    operator_lines: tuple[str, ...]  # the config's "domain;opset;Op{types}" lines
    tokens_identical: bool  # the same greedy tokens as device_check.json (the .onnx's)
    same_prefix: int
    greedy_steps: int
    measurement: Measurement


@dataclass(frozen=True)
class BudgetCheck:
    """One line of the summary table."""

    metric: str
    budget: float | None
    predicted: float | None
    measured: float | None
    unit: str
    judged_on: str  # "measured" or "predicted"
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class ItemScore:
    """One evaluation item for one model."""

    item: str
    correct: bool | None  # None for perplexity-only tasks
    detail: str  # "answered 18, expected 18", "passed", "failed: AssertionError", "timeout", "blocked: ..."
    completion: str  # what the model wrote (cut at the stop string)
    new_tokens: int


@dataclass(frozen=True)
class ModelScores:
    """One model's results on the evaluation's items."""

    label: str  # e.g. "dense (PyTorch)", "shipped int4 (onnxruntime)"
    metric: str  # "exact match", "pass@1" or "perplexity"
    score: float | None  # fraction correct; None for perplexity-only tasks
    perplexity: float  # of the reference answers given the items' own prompts, token-weighted
    top1_vs_reference: float | None  # next-token agreement with the reference model on those answers
    kl_vs_reference: float | None  # mean KL(reference || this model) per answer token, nats
    seconds: float
    items: tuple[ItemScore, ...]


@dataclass(frozen=True)
class Evaluation:
    """Task metrics of several models on the same items (see exporter.grading for prompts and grading)."""

    task: str
    items: int
    seed: int
    max_new_tokens: int
    reference: str | None  # the model top-1 and KL compare against
    sandbox_network: str | None  # how code execution was cut off from the network, for code tasks
    models: tuple[ModelScores, ...]


@dataclass(frozen=True)
class Spectrum:
    """What the selection method thought each basis of one layer is worth, in keeping order (for the report)."""

    layer: str
    scores: tuple[float, ...]  # normalised to sum 1
    kept: int | None  # None: the layer stayed dense


@dataclass(frozen=True)
class TokenizerCheck:
    """Whether the runtime apps use, reading the export folder, encodes the target application's texts into the
    token ids the quality was measured with (exporter.runtime_tokenizer)."""

    runtime: str | None  # e.g. "onnxruntime-genai 0.18.0"; None: not installed here, not checked
    texts: int
    differing: int  # texts encoded differently
    first_difference: str  # where the first differing text's encodings part
    passed: bool
    bos_left_out: str = ""  # the start token the model's tokenizer adds and the runtime, by default, does not


@dataclass(frozen=True)
class Quality:
    """Held-out quality of the shipped graph next to the dense model at the same precision (exporter.quality)."""

    task: str
    tokens: int  # held-out tokens scored
    window: int  # tokens per scoring window
    shipped_perplexity: float
    reference_perplexity: float  # the dense model, every weight rounded to nearest at the shipped precision
    dense_fp32_perplexity: float  # the dense model in fp32 (PyTorch)
    ratio: float  # shipped / reference perplexity
    top1_vs_reference: float  # next-token agreement with the reference
    kl_vs_reference: float  # mean KL(reference || shipped) per token, nats
    max_ratio: float  # the gate
    passed: bool


@dataclass(frozen=True)
class RunResult:
    """Everything one `edgeslim export` produced, as recorded in report.json."""

    model: str
    task: str
    method: str
    profile: DeviceProfile
    plan: RankPlan
    layers: tuple[LayerResult, ...]
    artifact: OnnxArtifact
    parity: tuple[ParityResult, ...]
    providers_not_available: tuple[str, ...]
    quantization_top1_agreement: float | None  # quantized vs unquantized PyTorch model, prompt positions
    measurement: Measurement
    host: dict[str, Any]
    host_predicted: Prediction
    checks: tuple[BudgetCheck, ...]
    passed: bool
    failures: tuple[str, ...] = field(default_factory=tuple)
    spectra: tuple[Spectrum, ...] = ()
    evaluations: tuple[Evaluation, ...] = ()  # with `export --eval`, one per task
    quality: Quality | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage, where a run's time goes
    stage_peak_mib: dict[str, float] = field(default_factory=dict)  # peak resident memory of the run in each stage
    providers: tuple[ProviderFit, ...] = ()  # what each listed (and each mobile) provider could run of the graph
    ort_package: OrtPackage | None = None  # with `export --ort`
    tokenizer: TokenizerCheck | None = None  # the runtime's tokenizer against the model's


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict tagged with its type and the schema version."""
    data = dataclasses.asdict(obj)
    return {"type": type(obj).__name__, "version": SCHEMA_VERSION, **data}


def to_json(obj: Any) -> str:
    """Stable JSON (sorted keys) so the same inputs give byte-identical files."""
    return json.dumps(to_dict(obj), indent=2, sort_keys=True) + "\n"
