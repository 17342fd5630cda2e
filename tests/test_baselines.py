"""Data-aware methods: each must beat plain SVD on the data it saw, at equal rank."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, train_tiny

from exporter.baselines import whitened_bases, whitened_svd, whitening
from exporter.calibration import calibration_batches
from exporter.collect import activation_stats
from exporter.contracts import RankPlan
from exporter.errors import UsageError
from exporter.factorize import factorize_
from exporter.models import describe, normalize_
from exporter.plan import layers_at
from exporter.select import get_method


def skewed_inputs(n: int, d_in: int) -> torch.Tensor:
    torch.manual_seed(1)
    mixing = torch.randn(d_in, d_in, dtype=torch.float64)
    return (torch.randn(n, d_in, dtype=torch.float64) * torch.logspace(-2, 1, d_in, dtype=torch.float64)) @ mixing


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # tall (through L) and wide (through W gram W^T)
def test_svdllm_truncation_loss_is_the_dropped_singular_values(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    x = skewed_inputs(400, shape[1])
    stats = {"gram": x.T @ x / 400}
    method = get_method("svdllm")
    factors = method.select(weight, None, stats, 6)
    loss = ((weight - factors.second @ factors.first) @ x.T).square().sum() / 400
    dropped = torch.linalg.svdvals(weight @ whitening(stats["gram"]))[6:]
    assert loss.item() == pytest.approx(dropped.square().sum().item(), rel=1e-8)


@pytest.mark.parametrize("shape", [(24, 56), (56, 24)])
def test_whitened_bases_are_those_of_w_times_the_cholesky_factor(shape):
    """U and s as LAPACK's SVD of W L gives them, and W rebuilt basis by basis from U diag(s) (V^T L^-1)."""
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    x = skewed_inputs(400, shape[1])
    gram = x.T @ x / 400  # positive definite, so Cholesky needs no jitter
    u, s, rows = whitened_bases(weight, gram)
    expected_u, expected_s, _ = torch.linalg.svd(weight.double() @ whitening(gram), full_matrices=False)
    assert torch.allclose(s, expected_s, rtol=1e-9, atol=0)
    assert torch.allclose((u * expected_u).sum(0).abs(), torch.ones_like(s), atol=1e-6)  # the same bases, up to sign
    assert torch.allclose(u @ (s[:, None] * rows), weight.double(), atol=1e-9)


def test_a_wide_layer_whose_inputs_span_too_few_directions_needs_no_jitter():
    """Inputs confined to 10 of 24 directions (a singular Gram matrix, which Cholesky cannot factor): the
    decomposition through W gram W^T still finds the exact SVD-LLM truncation, and all the energy in 10 bases."""
    torch.manual_seed(0)
    weight = torch.randn(16, 24, dtype=torch.float64)
    x = torch.randn(400, 10, dtype=torch.float64) @ torch.randn(10, 24, dtype=torch.float64)
    gram = x.T @ x / 400
    s = whitened_svd(weight, gram)[1]
    assert s[10:].max() < 1e-6 * s[0]
    factors = get_method("svdllm").select(weight, None, {"gram": gram}, 4)
    loss = ((weight - factors.second @ factors.first) @ x.T).square().sum() / 400
    assert loss.item() == pytest.approx(s[4:].square().sum().item(), rel=1e-8)


@pytest.mark.parametrize("name", ["asvd", "svdllm"])
def test_activation_aware_methods_beat_svd_on_their_data(name):
    torch.manual_seed(0)
    weight = torch.randn(32, 24, dtype=torch.float64)
    x = skewed_inputs(600, 24)
    stats = {"gram": x.T @ x / 600, "abs_mean": x.abs().mean(0)}

    def output_error(method: str) -> float:
        f = get_method(method).select(weight, None, stats, 8)
        return ((weight - f.second @ f.first) @ x.T).norm().item()

    assert output_error(name) < output_error("svd")


def test_fwsvd_minimizes_the_fisher_weighted_error():
    torch.manual_seed(0)
    weight = torch.randn(32, 24, dtype=torch.float64)
    fisher = torch.logspace(-2, 2, 32, dtype=torch.float64)

    def weighted_error(method: str) -> float:
        f = get_method(method).select(weight, None, {"row_fisher": fisher}, 8)
        return (fisher[:, None] * (weight - f.second @ f.first).square()).sum().item()

    assert weighted_error("fwsvd") < weighted_error("svd")


def test_taylor_keeps_the_bases_the_loss_depends_on():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    s = torch.linspace(4, 0.5, 16, dtype=torch.float64)
    weight = u[:, :16] @ torch.diag(s) @ v.T
    importance = torch.zeros(16, dtype=torch.float64)
    importance[-4:] = 1.0  # only the four smallest bases matter to the task
    stats = {"importance": importance, "gram": torch.eye(16, dtype=torch.float64)}  # white inputs: plain bases
    f = get_method("taylor").select(weight, None, stats, 4)
    kept = torch.linalg.svdvals(f.second @ f.first)[:4]
    assert torch.allclose(kept.sort().values, s[-4:].sort().values)


def calibration_loss(model, calibration) -> float:
    with torch.no_grad():
        return sum(model(input_ids=b, labels=b).loss.item() for b in calibration.batches) / len(calibration.batches)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny Llama trained for a few seconds on standard-library code, and that code as calibration data:
    a random model has no structure for a method to find (every basis is equally unimportant)."""
    return train_tiny(tokenizer)


# ASVD is left out: its activation scaling is a heuristic, not an error minimiser, and on this tiny model it ties
# with plain SVD (calibration loss 1.525 vs 1.523); the quality benchmark compares it on the real model.
@pytest.mark.parametrize("name", ["svdllm", "taylor", "hessian"])
def test_methods_that_see_the_data_beat_svd_on_the_tiny_model(name, trained):
    base, calibration = trained
    spec = describe(base)
    plan = RankPlan("t", "fp32", 0.4, 8, layers_at(spec, 0.4, 8), None, None)
    names = [layer.name for layer in plan.factorized]
    losses = {}
    for method_name in ("svd", name):
        model = copy.deepcopy(base)
        method = get_method(method_name)
        stats = method.collect(model, calibration, names)
        factorize_(model, plan, method, stats)
        losses[method_name] = calibration_loss(model, calibration)
    assert losses[name] < losses["svd"], losses


def test_activation_stats_leave_no_hooks(tokenizer):
    model = normalize_(build_tiny("gpt2"))
    calibration = calibration_batches(tokenizer, ["def f(x):\n    return x\n" * 40], 2, 32, 0)
    names = [layer.name for layer in describe(model).layers]
    stats = activation_stats(model, calibration, names)
    assert set(stats) == set(names)
    assert all(not model.get_submodule(n)._forward_pre_hooks for n in names)
    gram = stats[names[0]]["gram"]
    assert torch.allclose(gram, gram.T)


def test_too_little_calibration_data_is_one_line(tokenizer):
    with pytest.raises(UsageError, match="calibration data too small"):
        calibration_batches(tokenizer, ["tiny"], samples=4, seq_len=256, seed=0)
    with pytest.raises(UsageError, match="calibration-samples"):
        calibration_batches(tokenizer, ["tiny"], samples=0, seq_len=256, seed=0)


def test_basel_relearning_beats_svd_on_its_training_data(trained):
    base, calibration = trained
    spec = describe(base)
    plan = RankPlan("t", "fp32", 0.4, 8, layers_at(spec, 0.4, 8), None, None)
    names = [layer.name for layer in plan.factorized]
    ranks = {layer.name: layer.rank for layer in plan.factorized}
    losses = {}
    for method_name in ("svd", "basel"):
        model = copy.deepcopy(base)
        method = get_method(method_name)
        stats = method.collect(model, calibration, names, ranks=ranks)
        assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names), "collect restores modules"
        factorize_(model, plan, method, stats)
        losses[method_name] = calibration_loss(model, calibration)
    assert losses["basel"] < losses["svd"], losses


def test_basis_linear_starts_as_the_original_layer_and_prunes_to_count():
    from exporter.relearn import BasisLinear
    from exporter.select import svd

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    u, s, vh = svd(linear.weight)
    layer = BasisLinear(u, s, vh, linear.bias.detach())
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), linear(x), atol=1e-5)
    layer.prune_to(6)
    assert int(layer.mask.sum()) == 6
    assert torch.linalg.matrix_rank(layer.merged()) <= 6


def test_hutchinson_probe_matches_the_exact_hessian(trained):
    """One batch, one layer: the symmetric finite-difference probes give |g*s| + max(0, mean_z s*z*(H (z*s))/2),
    computed here with autograd's exact gradient and Hessian of the loss in coefficient space (z: each probe's
    signs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from exporter.calibration import Calibration
    from exporter.importance import PROBES, HessianImportance

    base, calibration = trained
    model = copy.deepcopy(base).double()
    one = Calibration(batches=calibration.batches[:1], fingerprint="one")
    name = "model.layers.1.mlp.down_proj"
    method = HessianImportance()
    estimate = method.collect(model, one, [name])[name]
    layer = model.get_submodule(name)
    original = layer.weight.detach().clone()
    u, s, rows = (t.double() for t in method._bases(original, estimate["gram"], name))

    def loss(delta: torch.Tensor) -> torch.Tensor:
        weight = original + (u * delta) @ rows
        output = torch.func.functional_call(model, {f"{name}.weight": weight}, (one.batches[0],),
                                            {"labels": one.batches[0]})
        return output.loss

    with sdpa_kernel(SDPBackend.MATH):
        zero = torch.zeros_like(s)
        gradient = torch.autograd.functional.jacobian(loss, zero)
        hessian = torch.autograd.functional.hessian(loss, zero)
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randint(0, 2, s.shape, generator=generator).double() * 2 - 1 for _ in range(PROBES)]
    curvature = sum(s * signs * (hessian @ (signs * s)) / 2 for signs in probes) / PROBES
    exact = (gradient * s).abs() + curvature.clamp(min=0)
    assert torch.equal(layer.weight, original), "the probe restores the weights"
    assert torch.allclose(estimate["importance"], exact, rtol=1e-3, atol=1e-6 * exact.abs().max())
