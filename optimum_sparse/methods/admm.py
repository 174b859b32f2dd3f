"""ELSA's ADMM, the solver: the penalty schedule, the projection onto the sparsity set and the z/u updates.

The x-step is the base optimizer's step on `∇f + λ(x − z + u)` (`proximal_term`); every K steps `z ← P_S(x + u)`
(`z_step` with the masks of `weight_mask`, or `global_masks` for one budget over all weights) and
`u ← u + α(x − z)` (`u_step`, rescaled when λ changes).

Tensor math only. The torch optimizer that runs these updates inside any training loop (its state, ELSA-L's float8
storage, sharded parameters, checkpoints) is the adapter `admm_optimizer.py`; which weights are pruned, and at what
sparsity, is decided by the method (`elsa.py`, `elsa_trainer.py`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .masks import layer_mask, layer_nm, nm_mask, num_pruned

__all__ = [
    "ADMMSettings", "PENALTY_SCHEDULES", "PROJECTIONS", "penalty_at", "global_masks", "global_count", "weight_mask",
    "projection_score", "sparsity_mask", "proximal_term", "z_step", "u_step", "GapStats", "admm_optimizer_class", "ADMMMixin",
]

logger = logging.getLogger(__name__)

PENALTY_SCHEDULES = ("constant", "linear", "cosine", "exponential")
PROJECTIONS = ("magnitude", "second_moment")


@dataclass
class ADMMSettings:
    """The ADMM part of ELSA (see `optimum_sparse.methods.elsa` for what each setting does).

    Attributes:
        names: full names of the pruned weights, in the order of the optimizer's ADMM parameter group.
        sparsities: target fraction of zeros of each; for N:M a multiple of `1/M` giving the weight's `N_i:M`.
        nm: `(n, m)`: `n` zeros in every `m` consecutive inputs (dim 1 of the weight).
        budget: `"layer"` (each weight its own count) or `"global"` (one count over all, unstructured only).
        projection: `"magnitude"` (`|x + u|`) or `"second_moment"` (`v ⊙ (x + u)²`, v = Adam's `exp_avg_sq`).
        penalty, penalty_init, penalty_schedule, total_steps: λ, from `penalty_init` to `penalty` over `total_steps`.
        interval: K, optimizer steps between z/u updates.
        alpha: dual step (over-relaxation).
        low_memory: ELSA-L: `z` in float8 (e4m3, one float32 scale per tensor), `u` in bfloat16.
        transposed: names whose weight is stored `[in, out]` (GPT-2's `Conv1D`): N:M groups run along dim 0.
        slices: fused mixture-of-experts parameters `[E, ...]`, `{name: {"sparsities": [per expert], "transposed":
            bool}}`: each expert's slice is projected on its own (its own count or N:M pattern, `[out, in]` or, when
            `transposed`, `[in, out]` storage); the name's entry in `sparsities` is the size-weighted mean.
    """

    names: list
    sparsities: list
    nm: Optional[tuple] = None
    budget: str = "layer"
    projection: str = "magnitude"
    penalty: float = 0.01
    penalty_init: Optional[float] = None
    penalty_schedule: str = "constant"
    total_steps: int = 1
    interval: int = 32
    alpha: float = 1.0
    low_memory: bool = False
    transposed: list = field(default_factory=list)
    slices: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("names")
        out.pop("sparsities")
        out.pop("transposed")
        out.pop("slices")
        return out


def penalty_at(step: int, settings: ADMMSettings) -> float:
    """λ at optimizer step `step` (constant, or from `penalty_init` to `penalty` along the schedule)."""
    end = settings.penalty
    if settings.penalty_schedule == "constant" or settings.penalty_init is None:
        return end
    start = settings.penalty_init
    t = min(max(step / max(settings.total_steps, 1), 0.0), 1.0)
    if settings.penalty_schedule == "linear":
        return start + (end - start) * t
    if settings.penalty_schedule == "cosine":
        return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * t))
    start = max(start, 1e-12)
    return start * (end / start) ** t


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def global_masks(scores: list, count: int) -> list:
    """Masks (`True` = pruned) removing exactly the `count` lowest of all `scores` together (non-negative floats).

    The threshold is found by bisection on the float32 bit patterns (which order non-negative floats), counting per
    tensor: no concatenated copy of the scores is ever made. Ties at the threshold go to the earliest positions.
    """
    total = sum(s.numel() for s in scores)
    if count <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    if count >= total:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    scores = [s.float() for s in scores]
    lo, hi = 0, 0x7F800000  # 0.0 .. +inf
    while lo < hi:  # smallest threshold t with #(score <= t) >= count
        mid = (lo + hi) // 2
        t = _bits_to_float(mid)
        if sum(int((s <= t).sum()) for s in scores) >= count:
            hi = mid
        else:
            lo = mid + 1
    t = _bits_to_float(lo)
    masks = [s < t for s in scores]
    missing = count - sum(int(m.sum()) for m in masks)
    for s, m in zip(scores, masks):
        if missing <= 0:
            break
        ties = torch.nonzero(s.flatten() == t).flatten()[:missing]
        m.view(-1)[ties] = True
        missing -= ties.numel()
    return masks


def global_count(numels: list, settings: ADMMSettings) -> int:
    """`floor(Σ numel_i · sparsity_i)`: with one sparsity for all, `floor(total · sparsity)`, as a layer's count."""
    return int(math.floor(sum(n * sp for n, sp in zip(numels, settings.sparsities)) + 1e-6))


def projection_score(value: torch.Tensor, importance: Optional[torch.Tensor]) -> torch.Tensor:
    """Score of each entry of `value` in the projection: `|value|`, or `v ⊙ value²` with `v` an importance (Adam's
    second moment)."""
    return value.abs() if importance is None else importance * value * value


def sparsity_mask(score: torch.Tensor, sparsity: float, nm: Optional[tuple], transposed: bool) -> torch.Tensor:
    """Mask (`True` = pruned) of one matrix: exactly `floor(numel · sparsity)` lowest scores, or the `N_i:M` pattern
    (`N_i = sparsity · M`) along the inputs; `transposed`: the matrix is stored `[in, out]`."""
    score = score.t() if transposed else score  # [out, in]: N:M groups along the inputs
    if nm is not None:
        mask = nm_mask(score, *layer_nm(nm, sparsity))
    else:
        mask = layer_mask(score, 0.0, count=num_pruned(score.numel(), sparsity))
    return mask.t() if transposed else mask


def weight_mask(score: torch.Tensor, index: int, settings: ADMMSettings) -> torch.Tensor:
    """The projection mask of pruned weight `index` (its own budget or N:M pattern); fused experts `[E, ...]` in
    `settings.slices` get one projection per expert's slice."""
    name = settings.names[index]
    slices = settings.slices.get(name)
    if slices is not None:
        return torch.stack([sparsity_mask(s, sparsity, settings.nm, slices["transposed"])
                            for s, sparsity in zip(score, slices["sparsities"])])
    # an unstructured count does not depend on the orientation: only N:M groups follow the storage layout
    transposed = settings.nm is not None and name in settings.transposed
    return sparsity_mask(score, settings.sparsities[index], settings.nm, transposed)


def proximal_term(x: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`x − z + u`: the gradient of `½‖x − z + u‖²`, added to `∇f` with weight λ before the base optimizer's step."""
    return x - z + u


def z_step(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`z ← P_S(x + u)`: `target = x + u` with the pruned entries set to zero."""
    return target.masked_fill(mask, 0.0)


def u_step(u: torch.Tensor, x: torch.Tensor, z: torch.Tensor, alpha: float, rescale: float) -> torch.Tensor:
    """`u ← (u + α(x − z)) · λ_old / λ_new` (the scaled dual follows a change of λ)."""
    return (u + alpha * (x - z)) * rescale


class GapStats:
    """Accumulates `‖x − z‖² / ‖x‖²` over the pruned weights and the share of the support that moved."""

    def __init__(self):
        self.gap = self.norm = self.changed = self.kept = 0.0
        self.compared = False

    def add(self, x, z, mask, previous_support) -> None:
        self.gap += float((x - z).pow(2).sum())
        self.norm += float(x.pow(2).sum())
        self.kept += float((~mask).sum())
        if previous_support is not None:
            self.compared = True
            self.changed += float(((~mask) != previous_support).sum())

    def metrics(self, group) -> dict:
        out = {"admm_gap": math.sqrt(self.gap / max(self.norm, 1e-30)), "admm_penalty": group["admm_penalty"],
               "admm_step": group["admm_step"]}
        if self.compared:
            out["admm_support_change"] = self.changed / max(2 * self.kept, 1.0)
        return out


def __getattr__(name: str):
    # the optimizer adapter moved to `admm_optimizer.py`; these names stay importable from here
    if name in ("ADMMMixin", "admm_optimizer_class"):
        from . import admm_optimizer

        return getattr(admm_optimizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
