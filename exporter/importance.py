"""One-shot basis importance: which bases u_i v_i^T matter for the target application's loss, without training.

W = sum_i s_i u_i v_i^T. The loss's derivative with respect to a basis coefficient is g_i = u_i^T (dL/dW) v_i, so
removing basis i changes the loss by about -g_i s_i (first-order Taylor). Importance is the per-batch magnitude
summed over the calibration batches, sum_b |g_i,b s_i|, and a layer keeps its `rank` most important bases —
not necessarily those with the largest singular values, which is the point of basis selection.
"""

from __future__ import annotations

import torch

from exporter.collect import gradient_passes
from exporter.select import Factors, SelectionMethod, register, svd


@register
class TaylorImportance(SelectionMethod):
    name = "taylor"
    needs = "gradients"
    description = "one-shot basis selection by first-order Taylor importance |g_i s_i| on the task's data"

    def collect(self, model, calibration, names, advance=lambda: None, ranks=None):
        bases = {}
        for name in names:
            u, s, vh = svd(model.get_submodule(name).weight, name, cache=self.cache)
            bases[name] = (u.float(), s.float(), vh.float())
        importance = {name: torch.zeros_like(bases[name][1], dtype=torch.float64) for name in names}

        def accumulate(name, grad):
            u, s, vh = bases[name]
            g = ((u.T @ grad) * vh).sum(1)  # u_i^T G v_i for every i, without forming U^T G V
            importance[name] += (g * s).abs().double()

        gradient_passes(model, calibration, names, accumulate, advance)
        return {name: {"importance": scores} for name, scores in importance.items()}

    def select(self, weight, bias, stats, rank):
        u, s, vh = svd(weight, cache=self.cache)
        keep = torch.topk(stats["importance"], rank).indices.sort().values
        return Factors(first=(s[keep, None] * vh[keep]).to(weight.dtype), second=u[:, keep].to(weight.dtype),
                       bias=bias)

    def scores(self, weight, stats):
        return stats["importance"].sort(descending=True).values
