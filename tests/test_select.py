"""Selection methods as pure linear algebra on random matrices (every registered method)."""

from __future__ import annotations

import pytest
import torch

from exporter.errors import NumericalError, UsageError
from exporter.select import get_method, method_names, svd


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(48, 32)


@pytest.mark.parametrize("name", method_names())
def test_full_rank_reproduces_weight(name, weight):
    factors = get_method(name).select(weight, None, None, 32)
    assert torch.allclose(factors.second @ factors.first, weight, atol=1e-4)


@pytest.mark.parametrize("name", method_names())
def test_rank_r_keeps_r_bases(name, weight):
    bias = torch.randn(48)
    factors = get_method(name).select(weight, bias, None, 8)
    assert factors.first.shape == (8, 32) and factors.second.shape == (48, 8)
    assert factors.rank == 8
    assert torch.equal(factors.bias, bias)


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
