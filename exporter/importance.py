"""One-shot basis importance: which bases of each layer matter for the target application's loss, without training.

The bases are those of the whitened SVD (as SVD-LLM and basel): W L = U diag(s) V^T with L the Cholesky factor of
the layer's input Gram matrix, so W = sum_i s_i u_i v~_i with v~_i the rows of V^T L^-1. (On SmolLM2 the plain SVD's
bases lose 100x more perplexity when dropped, whatever the importance score.) The loss's derivative with respect
to a coefficient is g_i = u_i^T (dL/dW) v~_i^T, and a layer keeps its `rank` most important bases, not necessarily
those with the largest s_i, which is the point of basis selection. Two scores:
- `taylor`, first order: sum over batches of |g_i s_i|, the change of the loss if basis i were removed, to first order.
- `hessian`, second order (Basis Selection with Importance, Asante, Chang & Li, arXiv 2605.01627): the loss change
  from removing basis i, first-order sensitivity plus curvature, mean_b |g_i s_i| + max(0, H_ii s_i^2 / 2), with the
  Hessian's diagonal estimated by Hutchinson probing in coefficient space: perturb every coefficient by +-eps*z_i*s_i
  (z Rademacher; symmetric, so no second backward is needed), then H_ii s_i ~= z_i (g+_i - g-_i) / (2 eps).
  The signed expectation -g_i s_i + H_ii s_i^2 / 2 was tried first: with one probe per batch its noise dominates,
  and it lost to plain SVD on the tiny test model (calibration loss 3.68 vs 3.39; the magnitude form: 3.385).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from exporter.baselines import projection_factors, whitened_bases, whitened_svd
from exporter.collect import activation_stats, gradient_passes, weight_gradients, weights_require_grad
from exporter.select import SelectionMethod, register

PERTURBATION = 1e-2  # relative size of the Hutchinson probe's step; gradient differences stay far above fp32 noise
PROBES = 4  # Hutchinson probes per batch; with 1 the curvature's noise outweighs it (tiny model: worse than svd)


class WhitenedBasisImportance(SelectionMethod):
    """Scores every basis of the whitened SVD from the task loss's gradients; keeps the highest-scoring ones."""

    needs = "gradients"
    passes = 2  # the inputs' Gram matrices, then the gradients

    def collect(self, model, calibration, names, advance=lambda: None, ranks=None):
        grams = {name: entry["gram"] for name, entry in activation_stats(model, calibration, names, advance).items()}
        bases = {name: self._bases(model.get_submodule(name).weight, grams[name], name) for name in names}
        importance = self.importance(model, calibration, bases, advance)
        return {name: {"gram": grams[name], "importance": importance[name]} for name in names}

    @abstractmethod
    def importance(self, model: nn.Module, calibration, bases: dict, advance) -> dict[str, torch.Tensor]:
        """Per layer, a score for every basis (float64, as long as s): higher means keep."""

    def select(self, weight, bias, stats, rank):
        u, _ = whitened_svd(weight, stats["gram"], cache=self.cache)
        return projection_factors(u[:, torch.topk(stats["importance"], rank).indices.sort().values], weight, bias)

    def scores(self, weight, stats):
        return stats["importance"].clamp(min=0).sort(descending=True).values

    def _bases(self, weight, gram, name) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, s and V^T L^-1 in the weight's dtype: W = U diag(s) (V^T L^-1)."""
        return tuple(t.to(weight.dtype) for t in whitened_bases(weight, gram, name, self.cache))


def coefficient_gradients(bases, grad: torch.Tensor) -> torch.Tensor:
    """g_i = u_i^T G v~_i^T for every basis, without forming U^T G V~^T."""
    u, _, rows = bases
    return ((u.T @ grad) * rows).sum(1)


@register
class TaylorImportance(WhitenedBasisImportance):
    name = "taylor"
    description = "one-shot basis selection by first-order Taylor importance |g_i s_i| on the task's data"

    def importance(self, model, calibration, bases, advance):
        scores = {name: torch.zeros_like(s, dtype=torch.float64) for name, (_, s, _) in bases.items()}

        def accumulate(name, grad):
            scores[name] += (coefficient_gradients(bases[name], grad) * bases[name][1]).abs().double()

        gradient_passes(model, calibration, list(bases), accumulate, advance)
        return scores


@register
class HessianImportance(WhitenedBasisImportance):
    name = "hessian"
    description = "one-shot basis selection by second-order importance |g_i s_i| + H_ii s_i^2 / 2 (Hutchinson)"

    def importance(self, model, calibration, bases, advance):
        modules = {name: model.get_submodule(name) for name in bases}
        originals = {name: module.weight.detach().clone() for name, module in modules.items()}
        first = {name: torch.zeros_like(s, dtype=torch.float64) for name, (_, s, _) in bases.items()}
        second = {name: torch.zeros_like(scores) for name, scores in first.items()}
        generator = torch.Generator().manual_seed(0)
        try:
            with weights_require_grad(model, modules):
                for batch in calibration.batches:
                    for probe in range(PROBES):
                        signs = {name: torch.randint(0, 2, s.shape, generator=generator).to(s.dtype) * 2 - 1
                                 for name, (_, s, _) in bases.items()}
                        plus = self._gradients_at(model, modules, originals, bases, signs, PERTURBATION, batch)
                        minus = self._gradients_at(model, modules, originals, bases, signs, -PERTURBATION, batch)
                        for name, (_, s, _) in bases.items():
                            if probe == 0:  # the symmetric pair's mean is the gradient at the weights themselves
                                first[name] += ((plus[name] + minus[name]) / 2 * s).abs().double()
                            curvature = signs[name] * (plus[name] - minus[name]) / (2 * PERTURBATION)  # ~ H_ii s_i
                            second[name] += (curvature * s / 2).double() / PROBES
                    advance()
        finally:
            with torch.no_grad():
                for name, module in modules.items():
                    module.weight.copy_(originals[name])
        batches = len(calibration.batches)
        return {name: (first[name] + second[name].clamp(min=0)) / batches for name in bases}

    @staticmethod
    def _gradients_at(model, modules, originals, bases, signs, step, batch) -> dict[str, torch.Tensor]:
        """Coefficient gradients with every coefficient moved by step * z_i * s_i."""
        with torch.no_grad():
            for name, module in modules.items():
                u, s, rows = bases[name]
                module.weight.copy_(originals[name] + step * (u * (signs[name] * s)) @ rows)
        grads = weight_gradients(model, modules, batch)
        with torch.no_grad():
            return {name: coefficient_gradients(bases[name], grad) for name, grad in grads.items()}
