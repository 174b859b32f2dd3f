"""Expert-channel pruning: the same number of intermediate channels removed from every routed expert of every MoE
block, the channels chosen per expert from the tokens routed to it (`structure="expert-channels"`).

The engine side (routing capture, slicing of the fused parameters, config update) is
`optimum_sparse.structured.expert_channels`; this file is the scoring math only. For channel `j` of one expert, with
`a_t` its intermediate activation (the input of its down projection) on routed token `t` of routing weight `w_t`
(Llama-4, whose experts take router-scaled inputs: `w_t = 1` on the scaled input):

- `"wanda"`: `‖W_down[:, j]‖₂ · sqrt(Σ_t w_t² a_tj²)` (Wanda-structured on the routed tokens; the expert's output enters
  the block scaled by `w_t`, so each token's share is weighted by `w_t²` as in the per-expert statistics);
- `"fluctuation"`: `‖W_down[:, j]‖₂² · Var_w(a_j)`, the `w²`-weighted variance of the channel over the routed tokens
  (FLAP's fluctuation metric, without its bias compensation).

Experts routed fewer than `min_expert_tokens` calibration tokens (default 8 here) are scored by weight magnitude,
`‖W_down[:, j]‖₂ · ‖W_up[j-rows]‖₂` (its gate and up rows), and recorded.
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

__all__ = ["ExpertChannels", "ExpertChannelsOptions", "CHANNEL_CRITERIA", "DEFAULT_MIN_TOKENS"]

CHANNEL_CRITERIA = ("wanda", "fluctuation")
DEFAULT_MIN_TOKENS = 8  # experts with fewer routed tokens are scored by weight magnitude (unless min_expert_tokens)


@dataclass
class ExpertChannelsOptions(Options):
    """`method_kwargs` of `method="expert-channels"`."""

    label: ClassVar[str] = "expert-channels"
    criterion: str = option("wanda", "Channel score on each expert's routed tokens: 'wanda' (|W_down[:, j]| · |a_j|) "
                                     "or 'fluctuation' (|W_down[:, j]|² · weighted variance of a_j).",
                            choices=CHANNEL_CRITERIA)


@register_method
class ExpertChannels(ExpertStructureMethod):
    """Removes intermediate channels of every routed expert (same count everywhere), scored per expert."""

    name = "expert-channels"
    options_class = ExpertChannelsOptions
    structure = "expert-channels"
    uniform_reason = "keeps the same number of channels in every expert (one intermediate size in the config)"

    @classmethod
    def check_sparsity(cls, config: "PruningConfig") -> None:
        if not 0 < config.sparsity < 1:
            raise ValueError("PruningConfig.sparsity is the fraction of each expert's channels removed; it must be in "
                             f"(0, 1), got {config.sparsity}.")

    def min_tokens(self) -> int:
        value = self.config.min_expert_tokens
        return DEFAULT_MIN_TOKENS if value is None else value

    def channel_scores(self, down: torch.Tensor, s0: float, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """Scores `[f]` (float64, higher = keep) of one expert from its down weight `[d, f]` and the routed sums
        `s0 = Σ w²`, `s1 = Σ w² a`, `s2 = Σ w² a²`."""
        column = down.to(torch.float64).pow(2).sum(dim=0)  # ‖W_down[:, j]‖²
        if self.criterion == "wanda":
            return column.sqrt() * s2.to(torch.float64).clamp_min(0).sqrt()
        if s0 <= 0:
            return torch.zeros_like(column)
        mean = s1.to(torch.float64) / s0
        return column * (s2.to(torch.float64) / s0 - mean.pow(2)).clamp_min(0)

    @staticmethod
    def magnitude_scores(down: torch.Tensor, up_rows: torch.Tensor) -> torch.Tensor:
        """Weight-only scores `[f]`: `‖W_down[:, j]‖₂ · ‖W_up[rows of j]‖₂`, `up_rows` `[f, r, d]` (`r` = 2 gated)."""
        column = down.to(torch.float64).pow(2).sum(dim=0).sqrt()
        return column * up_rows.to(torch.float64).flatten(1).pow(2).sum(dim=1).sqrt()

    @staticmethod
    def select(scores: torch.Tensor, keep: int) -> torch.Tensor:
        """The `keep` highest-scoring channels, sorted (equal scores keep the lower index)."""
        f = scores.numel()
        order = sorted(range(f), key=lambda j: (-float(scores[j]), j))
        return torch.tensor(sorted(order[:keep]), dtype=torch.long)
