"""Wanda-structured and magnitude-structured (the Wanda-sp / mag-sp baselines of the FLAP repository).

A channel's score is `mean_i |W_ij| · ‖x_j‖₂` (Wanda-sp) or `mean_i |W_ij|` (magnitude) on the output projection
(down_proj / o_proj); a KV group scores the sum over its columns. Every layer keeps the same ratio (rounded);
no weight update.
"""

from __future__ import annotations

import torch

from .structured_base import GroupDecision, StructuredMethod
from .structured_scoring import group_sum
from .base import register_method

__all__ = ["WandaStructuredPruning", "MagnitudeStructuredPruning"]


def _standardize(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.to(torch.float64)
    std = scores.std() if scores.numel() > 1 else torch.zeros((), dtype=scores.dtype)
    return (scores - scores.mean()) / std if float(std) > 0 else torch.zeros_like(scores)


@register_method
class WandaStructuredPruning(StructuredMethod):
    """Structured Wanda: keeps the highest-scoring channels/KV groups, uniform ratio, no update."""

    name = "wanda-structured"
    stats = "norms"

    def channel_scores(self, weight: torch.Tensor, stats) -> torch.Tensor:
        return weight.abs().mean(0).to(torch.float64) * stats.sq_sum.sqrt()

    def allocation_scores(self, kind, weight, stats, width, cost, reference_energy):
        return _standardize(group_sum(self.channel_scores(weight, stats), width))

    def select(self, kind, weight, bias, stats, width, keep):
        scores = group_sum(self.channel_scores(weight, stats), width)
        kept = torch.topk(scores, keep).indices.sort().values
        return GroupDecision(keep=kept)


@register_method
class MagnitudeStructuredPruning(WandaStructuredPruning):
    """Structured magnitude: `mean_i |W_ij|` per channel of the output projection; data-free."""

    name = "magnitude-structured"
    stats = "none"

    def channel_scores(self, weight, stats):
        return weight.abs().mean(0).to(torch.float64)
