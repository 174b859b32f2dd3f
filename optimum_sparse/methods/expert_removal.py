"""Whole-expert removal of mixture-of-experts models (`structure="experts"`): which experts of a block to keep.

Scores, per expert of one MoE block, from the calibration statistics (`optimum_sparse.structured.experts.ExpertStats`):

- `"contribution"` (default): `Σ_t ‖w_te · E_e(x_t)‖₂`, the norm the expert adds to the block output over the
  calibration tokens: its routed-token mass `Σ_t w_te` times its mass-weighted mean output norm;
- `"mass"`: `Σ_t w_te`, the routing weight it receives;
- `"frequency"`: the number of tokens routed to it;
- `"reconstruction"`: greedy, the expert whose removal (after those already removed, tokens re-routed by the router)
  changes the MoE module's output least on the calibration inputs goes first; run by the engine with the module's
  own forward (`optimum_sparse.structured.experts.reconstruction_choice`), not with group-limited routing.

The `round(sparsity · E)` lowest-scoring experts of every MoE block are removed (the same count in every block, so the
stock config's single expert count describes the model); with group-limited routing (DeepSeek-V3 `n_group`) the same
number is removed from every group. Ties go to the lower index. The engine is `optimum_sparse.structured.experts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..options import Options, option
from .base import register_method
from .structured_base import ExpertStructureMethod

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig
    from ..structured.experts import ExpertStats

__all__ = ["ExpertRemoval", "ExpertRemovalOptions", "CRITERIA"]

CRITERIA = ("contribution", "mass", "frequency", "reconstruction")


@dataclass
class ExpertRemovalOptions(Options):
    """`method_kwargs` of `method="expert-removal"`."""

    label: ClassVar[str] = "expert-removal"
    criterion: str = option("contribution", "Which experts go first: 'contribution' (routed mass times mean output "
                                            "norm), 'mass', 'frequency' or 'reconstruction' (greedy, docs/moe.md).",
                            choices=CRITERIA)


@register_method
class ExpertRemoval(ExpertStructureMethod):
    """Removes whole experts of every MoE block by a calibration criterion (`ExpertRemovalOptions.criterion`)."""

    name = "expert-removal"
    options_class = ExpertRemovalOptions
    structure = "experts"
    uniform_reason = "removes the same number of experts from every MoE block (one expert count in the config)"

    @classmethod
    def check_sparsity(cls, config: "PruningConfig") -> None:
        if not config.sparsity > 0:
            raise ValueError("PruningConfig.sparsity is the fraction of experts removed per MoE block; it must be > 0.")

    def expert_scores(self, stats: "ExpertStats") -> torch.Tensor:
        """Per-expert scores `[E]` (float64, higher = keep)."""
        return {"contribution": stats.contribution, "mass": stats.mass, "frequency": stats.tokens}[self.criterion]

    def select_experts(self, stats: "ExpertStats", remove: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(kept expert indices sorted, scores)`: the `remove` lowest-scoring experts go, `remove / groups`
        from each of `groups` consecutive equal groups."""
        scores = self.expert_scores(stats).to(torch.float64)
        num = scores.numel()
        if remove % groups or num % groups:
            raise ValueError(f"Cannot remove {remove} of {num} experts equally from {groups} groups.")
        size, per_group = num // groups, remove // groups
        keep = []
        for g in range(groups):
            part = scores[g * size:(g + 1) * size]
            # stable: equal scores keep the lower index
            order = sorted(range(size), key=lambda i: (float(part[i]), -i))
            keep += [g * size + i for i in order[per_group:]]
        return torch.tensor(sorted(keep), dtype=torch.long), scores
