"""Wanda (Sun et al., 2023): score |W_ij|·‖X_j‖₂, compared within each output row."""

from __future__ import annotations

from .base import PruningMethod, register_method
from .masks import select_mask

__all__ = ["WandaPruning"]


@register_method
class WandaPruning(PruningMethod):
    name = "wanda"
    stats = "norms"

    def prune_weight(self, weight, stats, sparsity):
        scores = weight.abs() * stats.sq_norms.sqrt().unsqueeze(0)
        mask = select_mask(scores, sparsity, self.layer_nm(sparsity), per_row=True)
        weight[mask] = 0.0
        return weight, mask
