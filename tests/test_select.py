"""Selection methods as pure linear algebra on random matrices (every registered method)."""

from __future__ import annotations

import shutil

import pytest
import torch

from exporter.errors import NumericalError, UsageError
from exporter.select import get_method, method_names, svd


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(48, 32)


def synthetic_stats(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of every kind, as a calibration pass would produce (non-uniform, so scaling is exercised)."""
    d_out, d_in = weight.shape
    x = torch.randn(500, d_in, dtype=torch.float64) * torch.linspace(0.1, 3, d_in, dtype=torch.float64)
    return {
        "gram": x.T @ x / 500,
        "abs_mean": x.abs().mean(0),
        "row_fisher": torch.linspace(0.5, 2, d_out, dtype=torch.float64),
        "importance": torch.rand(min(d_out, d_in), dtype=torch.float64),
        "weight": weight,  # a relearned matrix (basel): here the original
    }


@pytest.mark.parametrize("name", method_names())
def test_full_rank_reproduces_weight(name, weight):
    factors = get_method(name).select(weight, None, synthetic_stats(weight), 32)
    assert torch.allclose(factors.second @ factors.first, weight, atol=1e-4)


@pytest.mark.parametrize("name", method_names())
def test_rank_r_keeps_r_bases(name, weight):
    bias = torch.randn(48)
    factors = get_method(name).select(weight, bias, synthetic_stats(weight), 8)
    assert factors.first.shape == (8, 32) and factors.second.shape == (48, 8)
    assert factors.rank == 8
    assert torch.equal(factors.bias, bias)


@pytest.mark.parametrize("name", method_names())
def test_scores_follow_the_order_bases_are_kept(name, weight):
    scores = get_method(name).scores(weight, synthetic_stats(weight))
    assert scores.shape == (32,)
    assert torch.all(scores[:-1] >= scores[1:]) and torch.all(scores >= 0)


def test_svd_truncation_error_is_the_dropped_singular_values(weight):
    factors = get_method("svd").select(weight, None, None, 10)
    s = torch.linalg.svdvals(weight.double())
    error = torch.linalg.matrix_norm((factors.second @ factors.first).double() - weight.double())
    assert error.item() == pytest.approx(s[10:].square().sum().sqrt().item(), rel=1e-5)


def test_non_finite_weights_name_the_layer():
    bad = torch.full((4, 4), float("nan"))
    with pytest.raises((NumericalError, RuntimeError)) as error:
        svd(bad, "model.layers.3.mlp.up_proj")
    if isinstance(error.value, NumericalError):
        assert "model.layers.3.mlp.up_proj" in str(error.value)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UsageError, match="choose one of .*svd"):
        get_method("nope")


def test_svd_cache_resumes_and_can_be_disabled(tmp_path, weight, monkeypatch):
    from exporter import cache as cache_module
    from exporter.cache import TensorCache

    monkeypatch.setattr(cache_module, "RESERVE_BYTES", 0)  # whatever this disk has free
    cache = TensorCache(tmp_path)
    first = get_method("svd", cache).select(weight, None, None, 8)
    again = get_method("svd", cache).select(weight, None, None, 8)
    assert (cache.misses, cache.hits) == (1, 1)
    assert torch.equal(first.first, again.first) and torch.equal(first.second, again.second)
    other = get_method("svd", cache).select(weight + 1, None, None, 8)  # other weights: another key
    assert cache.misses == 2 and not torch.equal(other.first, first.first)
    (next(tmp_path.glob("*.safetensors"))).write_bytes(b"torn")  # a damaged entry is recomputed
    get_method("svd", cache).select(weight, None, None, 8)
    disabled = TensorCache(None)
    get_method("svd", disabled).select(weight, None, None, 8)
    assert disabled.hits == disabled.misses == 0


def test_cache_entries_that_would_leave_the_disk_too_full_are_not_written(tmp_path, weight, monkeypatch):
    from exporter import cache as cache_module

    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(cache_module, "RESERVE_BYTES", free)  # any entry would leave less than that free
    cache = cache_module.TensorCache(tmp_path)
    factors = get_method("svd", cache).select(weight, None, None, 8)
    assert factors.first.shape == (8, weight.shape[1]) and cache.skipped == 1
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


@pytest.mark.parametrize("shape", [(24, 56), (56, 24)])  # wide and tall: the Gram matrix of the shorter side
def test_svd_matches_lapack_down_to_small_singular_values(shape):
    """The decomposition from the smaller Gram matrix's eigenvectors agrees with LAPACK's SVD where truncation
    decides: singular values spread over four decades to 1e-9 relative, the same subspaces, W rebuilt."""
    torch.manual_seed(0)
    left = torch.linalg.qr(torch.randn(shape[0], min(shape), dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(shape[1], min(shape), dtype=torch.float64))[0]
    weight = left @ torch.diag(torch.logspace(0, -4, min(shape), dtype=torch.float64)) @ right.T
    u, s, vh = svd(weight.float())
    expected = torch.linalg.svdvals(weight.float().double())
    assert u.shape == (shape[0], min(shape)) and vh.shape == (min(shape), shape[1])
    assert torch.allclose(s, expected, rtol=1e-9, atol=0)
    assert torch.allclose(u @ torch.diag(s) @ vh, weight.float().double(), atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(min(shape), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(vh @ vh.T, torch.eye(min(shape), dtype=torch.float64), atol=1e-6)


def test_banded_products_equal_whole_ones(monkeypatch):
    """The banded float64 products (a 7B model's weights are never copied whole to float64) sum every band: with
    bands of a few rows they equal the whole products."""
    import exporter.select as select
    from exporter.baselines import _sandwich
    from exporter.factorize import LowRankLinear
    from exporter.select import Factors, transposed_product

    monkeypatch.setattr(select, "BAND_ENTRIES", 40)  # bands of 1-3 rows
    torch.manual_seed(0)
    left, right, weight = torch.randn(23, 7), torch.randn(23, 11), torch.randn(9, 23)
    middle = torch.randn(23, 23)
    middle = middle @ middle.T
    assert torch.allclose(transposed_product(left, right), left.double().T @ right.double(), atol=1e-10)
    assert torch.allclose(_sandwich(weight, middle), weight.double() @ middle.double() @ weight.double().T,
                          rtol=1e-12, atol=1e-9)
    layer = LowRankLinear(Factors(first=torch.randn(4, 23), second=torch.randn(9, 4), bias=None))
    whole = torch.linalg.matrix_norm((layer.second.weight @ layer.first.weight).double() - weight.double())
    assert layer.relative_error(weight) == pytest.approx(float(whole / torch.linalg.matrix_norm(weight.double())),
                                                         rel=1e-6)  # the product is fp32
