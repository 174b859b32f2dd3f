"""StructPrune: ADMM-coordinated structured pruning with OBS-style compensation and energy-based allocation.

Our reconstruction (the paper body was not available; see docs/structured.md for the derivation). For one module
(the output projection `W₀` `[out, G·w]` of the heads or of the MLP, input Hessian `H = Σ x xᵀ`):

    min_{W, Z} ‖(W − W₀) X‖²   s.t.  W = Z,  Z keeps k whole groups (columns of a channel / KV group)

ADMM in the diagonally preconditioned coordinates `W̃ = W D`, `D = diag(H)^½` (so the projection weighs a column by
its input energy, as Wanda does):
    W-step  W̃ = (W̃₀ H̃ + ρ(Z − U)) (H̃ + ρI)⁻¹       (one eigendecomposition of H̃, reused for every ρ)
    Z-step  Z = the k groups of W̃ + U with the largest ‖·‖²  (the closed-form structured projection)
    U-step  U += W̃ − Z;   ρ grows geometrically, the loop stops when the support is stable (4 iterations).
The final weights are the exact least-squares solution on the chosen support (the OBS compensation of the kept
channels), optionally with a bias correction (the constant feature joins the solve). The support is kept only if
its error beats greedy OBS group removal (OSSCAR/ZipLM style); otherwise greedy OBS's support is used, so the
result is never worse than that baseline on the module's calibration error.

Layer-wise allocation (`allocation`, default `"softmax"`): comparable score of a group = its OBS removal cost
`tr(W_g [H⁻¹]_gg⁻¹ W_gᵀ)` divided by the block's residual-stream energy and by the parameters the group removes.
`"threshold"` removes the globally cheapest groups (one shared threshold); `"softmax"` spreads the budget by the
softmax of the modules' standardised log-energies (see `optimum_sparse.allocation.structured`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..options import option
from .structured_base import GroupDecision, StructuredMethod, StructuredOptions
from .structured_scoring import damped, expand_groups, greedy_obs, obs_group_scores, solve_on_support, support_error
from .base import register_method

__all__ = ["StructPrunePruning", "StructPruneOptions", "admm_group_support"]

logger = logging.getLogger(__name__)


def admm_group_support(weight: torch.Tensor, H: torch.Tensor, width: int, keep: int, rho: float = 0.1,
                       growth: float = 1.3, max_iters: int = 30, patience: int = 4) -> tuple[torch.Tensor, int]:
    """Kept groups chosen by ADMM on `min ‖(W − W₀) X‖²` under a k-group constraint (see the module docstring).

    Args:
        weight: `[out, G·width]` float weights `W₀`.
        H: damped float64 Hessian `[G·width, G·width]`.
        rho: initial penalty, relative to the mean eigenvalue of the preconditioned Hessian.

    Returns:
        `(kept group indices, iterations run)`.
    """
    G = weight.shape[1] // width
    d = torch.diag(H).sqrt()
    Ht = H / d.unsqueeze(0) / d.unsqueeze(1)
    eig, Q = torch.linalg.eigh(Ht)
    eig = eig.clamp_min(1e-12 * float(eig.max()))
    # the iterations run in float32 (the support is what matters; the final weights are solved in float64)
    eig, Q = eig.to(torch.float32), Q.to(torch.float32)
    W0 = (weight.to(torch.float64) * d.unsqueeze(0)).to(torch.float32)
    W0H = (W0.to(torch.float64) @ Ht).to(torch.float32)

    def project(V):
        energy = V.pow(2).sum(0).reshape(G, width).sum(1)
        kept = torch.topk(energy, keep).indices
        mask = torch.zeros(G, dtype=torch.bool, device=V.device)
        mask[kept] = True
        return V * mask.repeat_interleave(width).unsqueeze(0), mask

    Z, support = project(W0)
    U = torch.zeros_like(W0)
    penalty = rho * float(eig.mean())
    stable, iters = 0, 0
    for iters in range(1, max_iters + 1):
        W = (((W0H + penalty * (Z - U)) @ Q) / (eig + penalty).unsqueeze(0)) @ Q.t()
        Z, new_support = project(W + U)
        U += W - Z
        stable = stable + 1 if torch.equal(new_support, support) else 0
        support = new_support
        if stable >= patience:  # only the support is used: the weights are re-solved on it exactly
            break
        penalty *= growth
    return support.nonzero().flatten(), iters


@dataclass
class StructPruneOptions(StructuredOptions):
    """`method_kwargs` of `method="structprune"`."""

    rho: float = option(0.1, "Initial ADMM penalty.")
    admm_iters: int = option(30, "ADMM iterations per module.")
    bias_correction: bool = option(True, "Solve a bias delta of the output projection with the kept weights (adds a "
                                         "bias to o_proj/down_proj when they have none).")

    def check(self, config) -> None:
        super().check(config)
        rho, iters = self.rho, self.admm_iters
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
            raise ValueError(f"PruningConfig.method_kwargs['rho'] must be a positive number, got {rho!r}.")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"PruningConfig.method_kwargs['admm_iters'] must be a positive integer, got {iters!r}.")
        if not isinstance(self.bias_correction, bool):
            raise ValueError("PruningConfig.method_kwargs['bias_correction'] must be True or False.")


@register_method
class StructPrunePruning(StructuredMethod):
    """Structured pruning by per-module ADMM with OBS compensation and softmax-energy layer-wise allocation.

    `method_kwargs` (`StructPruneOptions`): `allocation` (`"softmax"`, `"threshold"`, `"uniform"`), `temperature` (softmax, default 1),
    `max_deviation` (softmax: per-module sparsity within ±this of the target, default 0.2), `rho` (initial ADMM
    penalty, default 0.1), `admm_iters` (default 30), `bias_correction` (default `True`: solve a bias delta of the
    output projection with the kept weights; adds a bias to o_proj/down_proj when they have none).
    """

    name = "structprune"
    stats = "hessian"
    default_allocation = "softmax"
    options_class = StructPruneOptions

    def allocation_scores(self, kind, weight, stats, width, cost, reference_energy):
        H = damped(stats.hessian, self.config.damping)
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        scores = obs_group_scores(weight.to(torch.float64), hinv, width)
        return scores / max(reference_energy, 1e-30) / cost

    def adds_output_bias(self) -> bool:
        return bool(self.config.method_kwargs.get("bias_correction", True))

    def select(self, kind, weight, bias, stats, width, keep):
        kw = self.config.method_kwargs
        H = damped(stats.hessian, self.config.damping)
        W = weight.to(torch.float64)
        total = float(torch.einsum("oi,ij,oj->", W, H, W)) or 1e-30
        candidates = {}
        kept, iters = admm_group_support(W, H, width, keep, rho=kw.get("rho", 0.1), max_iters=kw.get("admm_iters", 30))
        candidates["admm"] = kept
        candidates["greedy_obs"] = greedy_obs(W, H, width, keep)
        errors = {}
        for label, groups in candidates.items():
            cols = expand_groups(groups, width)
            errors[label] = support_error(W, solve_on_support(W, H, cols), H, cols) / total
        chosen = min(errors, key=errors.get)
        groups = candidates[chosen].sort().values
        cols = expand_groups(groups, width)
        bias_delta = None
        if kw.get("bias_correction", True) and stats.num_tokens:
            n = W.shape[1]
            Ha = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=H.device)
            Ha[:n, :n] = H
            Ha[:n, n] = Ha[n, :n] = stats.sum.to(H.device)
            Ha[n, n] = stats.num_tokens * (1.0 + self.config.damping)
            Wa = torch.cat([W, torch.zeros(W.shape[0], 1, dtype=W.dtype, device=W.device)], 1)
            solved = solve_on_support(Wa, Ha, torch.cat([cols, torch.tensor([n], device=cols.device)]))
            new, bias_delta = solved[:, :-1], solved[:, -1]
        else:
            new = solve_on_support(W, H, cols)
        diagnostics = {"relative_error": errors[chosen], "support": chosen, "admm_iters": iters,
                       "admm_relative_error": errors["admm"], "greedy_relative_error": errors["greedy_obs"]}
        return GroupDecision(keep=groups, weight=new.to(torch.float32), bias_delta=
                             None if bias_delta is None else bias_delta.to(torch.float32), diagnostics=diagnostics)
