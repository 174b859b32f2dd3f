"""Magnitude pruning: remove the smallest |W| of each layer (no calibration data)."""

from __future__ import annotations

from .base import PruningMethod, register_method
from .masks import select_mask

__all__ = ["MagnitudePruning"]


@register_method
class MagnitudePruning(PruningMethod):
    name = "magnitude"
    stats = "none"

    def prune_weight(self, weight, stats, sparsity):
        mask = select_mask(weight.abs(), sparsity, self.layer_nm(sparsity), per_row=False)
        weight[mask] = 0.0
        return weight, mask
