"""FLAP (An et al., AAAI 2024): fluctuation-based structured pruning with bias compensation.

Score of input channel `j` of the output projection (o_proj / down_proj), WIFV: `Var(x_j) · ‖W_{:,j}‖²`; a KV
group scores the sum over its columns. Scores are standardised per module and ranked globally (FLAP's AL-AM: the
`threshold` allocation, each group weighted by the parameters it removes). The removed channels' mean
contribution is folded into the output projection's bias: `b += W_{:,S} · x̄_S`.
"""

from __future__ import annotations

import torch

from .structured_base import GroupDecision, StructuredMethod
from .structured_scoring import expand_groups, group_sum
from .base import register_method
from .wanda_structured import _standardize

__all__ = ["FLAPPruning"]


@register_method
class FLAPPruning(StructuredMethod):
    name = "flap"
    stats = "norms"
    default_allocation = "threshold"

    def adds_output_bias(self) -> bool:
        return True

    @staticmethod
    def channel_scores(weight: torch.Tensor, stats) -> torch.Tensor:
        return stats.variance * weight.to(torch.float64).pow(2).sum(0)

    def allocation_scores(self, kind, weight, stats, width, cost, reference_energy):
        return _standardize(group_sum(self.channel_scores(weight, stats), width))

    def select(self, kind, weight, bias, stats, width, keep):
        scores = group_sum(self.channel_scores(weight, stats), width)
        kept = torch.topk(scores, keep).indices.sort().values
        removed = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
        removed[kept] = False
        cols = expand_groups(removed.nonzero().flatten(), width)
        delta = weight.to(torch.float64)[:, cols] @ stats.mean[cols]
        return GroupDecision(keep=kept, bias_delta=delta.to(torch.float32))
