"""Statistics at the input of an output projection, and the tensor math shared by the structured methods.

Everything works on the *output* projection of a structure (attention `o_proj`, MLP `down_proj`): its input
columns come in groups of `width` consecutive features (one MLP channel: width 1; one KV group: `r·head_dim`),
and removing a group removes those columns (and the matching rows of the input projections, which need no math).
Numerics in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .linalg import damped_cholesky

__all__ = [
    "InputStats", "group_sum", "damped", "obs_group_scores", "solve_on_support", "greedy_obs", "support_error",
    "expand_groups",
]


@dataclass
class InputStats:
    """Running statistics of a linear layer's input features (float64 sums, optional float32 `Σ x xᵀ`).

    Attributes:
        num_tokens: tokens seen.
        sum: `Σ x` per feature.
        sq_sum: `Σ x²` per feature.
        hessian: `Σ x xᵀ` (`[in, in]`) when requested.
    """

    num_tokens: int = 0
    sum: Optional[torch.Tensor] = None
    sq_sum: Optional[torch.Tensor] = None
    hessian: Optional[torch.Tensor] = None
    want_hessian: bool = False

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        x64 = x.to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sq_sum = torch.zeros_like(self.sum)
        self.sum.add_(x64.sum(0))
        self.sq_sum.add_((x64 * x64).sum(0))
        if self.want_hessian:
            x32 = x.to(torch.float32)
            if self.hessian is None:
                self.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.hessian.addmm_(x32.t(), x32)
        self.num_tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.num_tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per feature (FLAP's "fluctuation")."""
        n = max(self.num_tokens, 2)
        return ((self.sq_sum - self.sum * self.sum / n) / (n - 1)).clamp_min(0.0)


def group_sum(values: torch.Tensor, width: int) -> torch.Tensor:
    """Sums per-feature `values` over consecutive groups of `width` features."""
    return values.reshape(-1, width).sum(1)


def expand_groups(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Feature indices of the given groups."""
    return (groups.unsqueeze(1) * width + torch.arange(width, device=groups.device)).reshape(-1)


def damped(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """float64 `H + λ·mean(diag)·I` (dead features get a unit diagonal)."""
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damping * torch.diag(H).mean().clamp_min(1e-12))
    return H


def obs_group_scores(weight: torch.Tensor, hinv: torch.Tensor, width: int) -> torch.Tensor:
    """OBS cost of removing each group alone, with optimal compensation by the other columns:
    `tr(W_g [H⁻¹]_gg⁻¹ W_gᵀ)` (`weight` `[out, G·width]`, `hinv` the inverse Hessian)."""
    G = weight.shape[1] // width
    if width == 1:
        return weight.pow(2).sum(0) / torch.diag(hinv).clamp_min(1e-30)
    blocks = hinv.reshape(G, width, G, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, w, w]
    wg = weight.reshape(weight.shape[0], G, width).permute(1, 2, 0)  # [G, w, out]
    solved = torch.linalg.solve(blocks, wg)
    return (wg * solved).sum((1, 2))


def solve_on_support(weight: torch.Tensor, H: torch.Tensor, keep_cols: torch.Tensor) -> torch.Tensor:
    """Least-squares weights on the kept columns: `argmin_V ‖W X − V X_K‖² = W H_{:,K} H_KK⁻¹` (`H` damped)."""
    HK = H.index_select(1, keep_cols)
    L = damped_cholesky(HK.index_select(0, keep_cols), 0.0)
    rhs = weight.to(torch.float64) @ HK  # [out, K]
    return torch.cholesky_solve(rhs.t(), L).t()


def support_error(weight: torch.Tensor, new_weight: torch.Tensor, H: torch.Tensor, keep_cols: torch.Tensor) -> float:
    """`‖W X − V X_K‖²` (in units of `H`) for `new_weight` `V` on columns `keep_cols`."""
    delta = weight.to(torch.float64).clone()
    delta[:, keep_cols] -= new_weight.to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", delta, H, delta))


def greedy_obs(weight: torch.Tensor, H: torch.Tensor, width: int, keep: int, rounds: int = 32) -> torch.Tensor:
    """Kept groups after removing groups greedily by OBS cost, in up to `rounds` batches (OSSCAR/ZipLM style):
    each batch removes the cheapest groups, updates the remaining weights and downdates `H⁻¹`."""
    G = weight.shape[1] // width
    W = weight.to(torch.float64).clone()
    hinv = torch.cholesky_inverse(damped_cholesky(H, 0.0))
    alive = torch.ones(G, dtype=torch.bool, device=W.device)
    remaining = G - keep
    per_round = max(1, -(-remaining // rounds))
    while remaining > 0:
        scores = obs_group_scores(W, hinv, width)
        scores[~alive] = float("inf")
        drop = torch.topk(scores, min(per_round, remaining), largest=False).indices
        cols = expand_groups(drop, width)
        block = hinv[cols][:, cols]
        # W ← W − W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S: ;  H⁻¹ ← H⁻¹ − [H⁻¹]_:S [H⁻¹]_SS⁻¹ [H⁻¹]_S:
        coef = torch.linalg.solve(block, hinv[cols])  # [|S|, in]
        W -= W[:, cols] @ coef
        hinv -= hinv[:, cols] @ coef
        hinv[cols, :] = 0.0
        hinv[:, cols] = 0.0
        hinv[cols, cols] = 1.0
        W[:, cols] = 0.0
        alive[drop] = False
        remaining -= len(drop)
    return alive.nonzero().flatten()
