"""ALPS (Meng, Behdin, Wang & Mazumder, NeurIPS 2024): layer-wise pruning by ADMM under an exact sparsity constraint.

For a linear layer with dense weight `W0` (`[out, in]`) and input Gram matrix `H = Σ x xᵀ`, ALPS solves

    min_W  tr((W − W0) (H + δI) (W − W0)ᵀ)   s.t.  W has the target number of zeros (or the N:M pattern)

by ADMM on the split `W = D`, `D` in the sparsity set. As in the authors' code (`mazumder-lab/ALPS`, see
`research/admm.md`):

* the problem is Jacobi-scaled, `s_j = sqrt(H_jj + δ)`, `H̃ = S⁻¹(H + δI)S⁻¹`, `W̃ = W S`: the magnitude projection
  in scaled space keeps the largest `|W_ij|·s_j`, a (damped) Wanda score, over the whole matrix (unstructured) or in
  every group of M inputs (N:M);
* `H̃ = QΛQᵀ` is computed once (float64 `eigh`), so each W-step `(H̃ + ρI)⁻¹(·)` is two matrix products, for any ρ;
  layers fed the same input (q/k/v, gate/up) share that factorization;
* ρ follows the support-change controller: every 3 iterations the number of support changes decides whether ρ grows
  (×1.3, ×1.2, ×1.1), shrinks (÷5, with a restart while ρ has never grown) or the run stops (support frozen after ρ
  has grown, or fewer than 0.03% changes after iteration 30);
* the primal iterate is projected at the end, and the weights on that fixed support are refined by conjugate
  gradients, batched over output rows.

Differences from the reference code: the CG stopping test uses the residual restricted to the support (the reference
tests the full residual, which never vanishes, so its CG always runs `maxiter` steps); ρ is a real option (the
reference's `--rho` flag is parsed but never used); the sparsity budget is exact (`floor(numel · sparsity)` zeros,
like every method here); the ADMM can be warm-started from another method's result and then never returns a worse
layer objective than that warm start.

This file is the solver (tensor math only); the method (its options, the shared factorization of layers fed the same
input, the warm start run on the block) is `alps_lifecycle.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import NonFiniteActivationError
from .masks import layer_mask, nm_mask, num_pruned

__all__ = ["ALPSFactor", "ALPSResult", "alps_factor", "alps_prune", "masked_cg"]

logger = logging.getLogger(__name__)

@dataclass
class ALPSFactor:
    """Everything ALPS needs from one input Gram matrix, computed once and shared by the layers it feeds.

    Attributes:
        scale: `s = sqrt(diag(H) + δ)`, `[in]`.
        hessian: the scaled damped Gram matrix `H̃` (unit diagonal), float32 `[in, in]`.
        eigvecs, eigvals: `H̃ = Q diag(Λ) Qᵀ` (float32).
    """

    scale: torch.Tensor
    hessian: torch.Tensor
    eigvecs: torch.Tensor
    eigvals: torch.Tensor

    def solve(self, rhs: torch.Tensor, rho: float) -> torch.Tensor:
        """`rhs (H̃ + ρI)⁻¹` for `rhs` `[out, in]` (rows are independent right-hand sides)."""
        return ((rhs @ self.eigvecs) / (self.eigvals + rho)) @ self.eigvecs.t()


@dataclass
class ALPSResult:
    """A pruned weight (float32 `[out, in]`), its mask (`True` = pruned) and what the solver did."""

    weight: torch.Tensor
    mask: torch.Tensor
    iterations: int = 0
    rho: float = 0.0
    restarts: int = 0
    cg_iterations: int = 0
    objective: float = math.nan  # tr(ΔW H̃ ΔWᵀ) / tr(W̃0 H̃ W̃0ᵀ), damped and scaled
    objective_admm: float = math.nan  # the same before the CG refinement
    objective_warm_start: Optional[float] = None
    source: str = "alps"
    seconds: float = 0.0

    def diagnostics(self) -> dict:
        out = {"alps_iterations": self.iterations, "alps_rho": self.rho, "alps_restarts": self.restarts,
               "alps_cg_iterations": self.cg_iterations, "alps_objective": self.objective,
               "alps_objective_admm": self.objective_admm, "alps_seconds": round(self.seconds, 3)}
        if self.objective_warm_start is not None:
            out["alps_objective_warm_start"] = self.objective_warm_start
            out["alps_kept"] = self.source
        return out


def alps_factor(hessian: torch.Tensor, damping: float = 0.01) -> ALPSFactor:
    """Scales and factors `hessian + damping·mean(diag)·I` (see the module docstring).

    Raises:
        `NonFiniteActivationError` when `hessian` has non-finite entries.
    """
    if not torch.isfinite(hessian).all():
        raise NonFiniteActivationError("The Hessian (Σ x xᵀ of the calibration inputs) has non-finite entries: "
                                       "the inputs overflowed (float16?); prune in bfloat16 or float32.")
    H = hessian.to(torch.float32).clone()
    diag = torch.diagonal(H)
    delta = damping * float(diag.mean())
    if not delta > 0:  # an all-zero Hessian: any damping makes it the identity problem
        delta = 1.0
    diag.add_(delta)
    scale = diag.sqrt()
    H.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1))
    H = (H + H.t()) / 2
    eigvals, eigvecs = torch.linalg.eigh(H.double())
    return ALPSFactor(scale=scale, hessian=H, eigvecs=eigvecs.float(), eigvals=eigvals.clamp_min(0).float())


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """ALPS needs true float32 products (the reference disables TF32 globally); restored on exit."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _pruned(values: torch.Tensor, count: int, nm: Optional[tuple[int, int]]) -> torch.Tensor:
    """The projection's mask: `True` on the `count` smallest |values| (or N of every M inputs)."""
    scores = values.abs()
    return nm_mask(scores, *nm) if nm is not None else layer_mask(scores, 0.0, count=count)


def _objective(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    return float((delta @ hessian * delta).sum())


def masked_cg(hessian: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor,
              iterations: int, tolerance: float) -> tuple[torch.Tensor, int]:
    """Conjugate gradients for `min_W tr((W − W0) H (W − W0)ᵀ)` with `W` zero off `keep`, one system per row.

    `target` is `W0 H`; `weight` the starting point (zero off `keep`). Stops when every row's residual restricted to
    its support is below `tolerance` times that row's `‖(W0 H) ⊙ keep‖` (or after `iterations`). Returns the weight and
    the number of iterations run.
    """
    keep = keep.to(weight.dtype)
    W = weight * keep
    R = (target - W @ hessian) * keep
    P = R.clone()
    rr = (R * R).sum(1)
    stop = (tolerance * (target * keep).norm(dim=1)).pow(2)
    done = 0
    for done in range(1, iterations + 1):
        if bool((rr <= stop).all()):
            done -= 1
            break
        HP = (P @ hessian) * keep
        curvature = (P * HP).sum(1)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(1e-30), torch.zeros_like(rr))
        W.addcmul_(alpha.unsqueeze(1), P)
        R.addcmul_(alpha.unsqueeze(1), HP, value=-1.0)
        rr_new = (R * R).sum(1)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        P = R + beta.unsqueeze(1) * P
        rr = rr_new
    return W * keep, done


@torch.no_grad()
def alps_prune(
    weight: torch.Tensor,
    hessian: Optional[torch.Tensor],
    sparsity: float,
    nm: Optional[tuple[int, int]] = None,
    damping: float = 0.01,
    factor: Optional[ALPSFactor] = None,
    warm_start: Optional[torch.Tensor] = None,
    rho: float = 0.1,
    max_iterations: int = 300,
    update_every: int = 3,
    switch_iteration: int = 30,
    min_change: float = 3e-4,
    cg_iterations: int = 50,
    cg_tolerance: float = 1e-4,
) -> ALPSResult:
    """Prunes `weight` (`[out, in]`) against the input Gram matrix `hessian` (`[in, in]`) by ALPS.

    Args:
        weight: the dense weights (converted to float32; a new tensor is returned).
        hessian: `Σ x xᵀ` over the calibration tokens (any positive scale); unused when `factor` is given.
        sparsity: fraction of zeros (unstructured): exactly `floor(numel · sparsity)` weights are removed.
        nm: `(n, m)`: `n` zeros in every `m` consecutive inputs of each row.
        damping: relative damping `δ = damping · mean(diag H)`.
        factor: `alps_factor(hessian, damping)`, when several weights share `hessian`.
        warm_start: a pruned weight from another method (`[out, in]`, zeros where pruned): the ADMM's first sparse
            iterate. The result is the better, on the layer objective, of ALPS and this warm start (refined on its
            support by the same CG).
        rho: initial ADMM penalty.
        max_iterations, update_every, switch_iteration, min_change: the ρ controller (module docstring).
        cg_iterations, cg_tolerance: the conjugate-gradient refinement on the final support (0 iterations: none).

    Returns:
        An `ALPSResult`; removed weights are exactly `+0.0`.
    """
    started = time.perf_counter()
    W0 = weight.to(torch.float32)
    rows, cols = W0.shape
    if nm is not None and nm[0] == 0:  # a 0:M layer (layer-wise N:M allocation) stays dense
        return ALPSResult(weight=W0.clone(), mask=torch.zeros_like(W0, dtype=torch.bool), objective=0.0,
                          objective_admm=0.0, seconds=time.perf_counter() - started)
    F = factor if factor is not None else alps_factor(hessian, damping)
    count = num_pruned(W0.numel(), sparsity) if nm is None else rows * cols // nm[1] * nm[0]
    kept = max(W0.numel() - count, 1)
    result = ALPSResult(weight=W0.clone(), mask=torch.zeros_like(W0, dtype=torch.bool))

    with _full_fp32_matmul():
        W0s = W0 * F.scale
        target = W0s @ F.hessian  # W̃0 H̃: the data term of the W-step
        energy = max(_objective(W0s, F.hessian), 1e-30)
        start = W0s if warm_start is None else warm_start.to(W0s) * F.scale
        mask0 = _pruned(start, count, nm)
        D0 = start.masked_fill(mask0, 0.0)
        W, D, V = W0s.clone(), D0.clone(), torch.zeros_like(W0s)
        mask_prev, grown, restarts = mask0, False, 0
        it = 0
        for it in range(1, max_iterations + 1):
            W = F.solve(target - V + rho * D, rho)
            D = W + V / rho
            mask = _pruned(D, count, nm)
            D.masked_fill_(mask, 0.0)
            V.add_(W - D, alpha=rho)
            if it % update_every:
                continue
            change = int((mask != mask_prev).sum())
            mask_prev = mask
            ratio = change / kept
            if ratio > 0.1:
                rho, grown = rho * 1.3, True
            elif ratio > 0.005:
                rho, grown = rho * 1.2, True
            elif change > 0:
                if grown:
                    rho *= 1.1
                else:  # the support barely moves with a penalty that never grew: smaller ρ, from scratch
                    rho /= 5
                    W, D, V = W0s.clone(), D0.clone(), torch.zeros_like(W0s)
                    restarts += 1
            elif grown:
                break
            else:
                rho /= 5
            rho = min(rho, 1e6)
            if it > switch_iteration and ratio < min_change:
                break
        mask = _pruned(W, count, nm)
        W = W.masked_fill(mask, 0.0)
        result.objective_admm = _objective(W - W0s, F.hessian) / energy
        if cg_iterations > 0:
            W, result.cg_iterations = masked_cg(F.hessian, target, W, ~mask, cg_iterations, cg_tolerance)
        result.objective = _objective(W - W0s, F.hessian) / energy
        if warm_start is not None:  # the warm start, refined on its own support the same way
            warm = start.masked_fill(mask0, 0.0)
            if cg_iterations > 0:
                warm, _ = masked_cg(F.hessian, target, warm, ~mask0, cg_iterations, cg_tolerance)
            result.objective_warm_start = _objective(warm - W0s, F.hessian) / energy
            if not result.objective <= result.objective_warm_start:
                W, mask, result.objective, result.source = warm, mask0, result.objective_warm_start, "warm_start"

    new = W / F.scale
    new[mask] = 0.0  # +0.0, never -0.0
    if not torch.isfinite(new).all():
        raise FloatingPointError("ALPS produced non-finite weights; raise the damping.")
    result.weight, result.mask = new, mask
    result.iterations, result.rho, result.restarts = it, rho, restarts
    result.seconds = time.perf_counter() - started
    return result


def __getattr__(name: str):
    # the method and its options live in the lifecycle adapter (kept importable from here)
    if name in ("ALPSPruning", "ALPSOptions"):
        from . import alps_lifecycle

        return getattr(alps_lifecycle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
