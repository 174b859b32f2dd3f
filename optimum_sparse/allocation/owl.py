"""OWL (Yin et al., ICML 2024): block sparsity from the share of outlier Wanda scores.

For each decoder block, the layer-wise outlier distribution (LOD) is the fraction of Wanda scores `|W_ij|·‖X_j‖₂`
(over all the block's target linears, on dense calibration activations) above `M` times their mean. Blocks with more
outliers are pruned less: `s_b = s − (L̃_b − mean L̃)` with `L̃` the LOD min-max scaled to `[0, 2λ]`.

Differences from the reference code (luuyin/OWL): the ratios are clipped to `[s − λ, s + λ]` and fitted to the
global target in *parameters* (the reference averages block ratios unweighted, exact only for equal-size blocks and
no `ignore` list), a constant LOD falls back to uniform instead of dividing by zero, and the statistics come from the
library's block engine (any architecture, offloaded models included).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.linears import read_weight
from ..engine.sequential import run_sequential
from ..methods.base import PruningMethod
from ..methods.masks import num_pruned
from ..options import Options, option
from .base import Allocator, allocation_from_counts, fit_counts, register_allocator
from .nm import fit_nm_steps, nm_allocation, nm_budget

__all__ = ["OWLAllocator", "outlier_ratio", "owl_block_sparsity"]

logger = logging.getLogger(__name__)

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of the entries of `scores` (concatenated) above `m` times their mean."""
    flat = torch.cat([s.flatten() for s in scores]).to(torch.float64)
    return float((flat > m * flat.mean()).double().mean())


def owl_block_sparsity(lod: list[float], target: float, lam: float) -> list[float]:
    """OWL's block sparsities `s − (L̃ − mean L̃)`, `L̃ = 2λ·(LOD − min)/(max − min)` (uniform if LOD is constant)."""
    lo, hi = min(lod), max(lod)
    if hi - lo <= 1e-12:
        return [target] * len(lod)
    scaled = [2 * lam * (v - lo) / (hi - lo) for v in lod]
    mean = sum(scaled) / len(scaled)
    return [target - (v - mean) for v in scaled]


class _OutlierProbe(PruningMethod):
    """Engine pass that leaves the weights dense and records each block's outlier ratio of Wanda scores."""

    name = "owl-probe"
    stats = "norms"

    def __init__(self, config, m: float):
        super().__init__(config)
        self.m = m
        self.ratios: dict[int, float] = {}

    def prune_block(self, job):
        names = list(job.linears)
        stats = job.collect_stats(names, want_hessian=False)
        scores = [read_weight(job.linears[n], job.device).abs() * stats[n].sq_norms.sqrt().unsqueeze(0) for n in names]
        self.ratios[job.index] = outlier_ratio(scores, self.m)


@dataclass
class OWLOptions(Options):
    """`allocation_kwargs` of `allocation="owl"`."""

    label = "OWL"
    kind = "allocation_kwargs"

    M: float = option(DEFAULT_M, "Outlier threshold: a weight score above M times its layer's mean is an outlier.")
    lambda_: Optional[float] = option(None, "Half-width of the sparsity band around the target (default 0.08; N:M: "
                                            "one step, 1/M).", key="lambda")

    def check(self, config) -> None:
        m, lam = self.M, DEFAULT_LAMBDA if self.lambda_ is None else self.lambda_
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise ValueError(f"PruningConfig.allocation_kwargs['M'] must be a positive number, got {m!r}.")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam < 1:
            raise ValueError(f"PruningConfig.allocation_kwargs['lambda'] must be a number in [0, 1), got {lam!r}.")


@register_allocator
class OWLAllocator(Allocator):
    """Outlier-weighted layer-wise sparsity. `allocation_kwargs`: `OWLOptions` (`M`, default 5, and `lambda`, band
    half-width, default 0.08: the paper's values at 70%)."""

    name = "owl"
    needs_calibration = True
    options_class = OWLOptions

    def allocate(self, model, modules, method, input_ids, progress=True):
        m = float(self.options.M)
        nm = self.config.nm
        # N:M: one N step each side by default (0.08 is less than one step for M < 13: OWL would be uniform)
        lam = float(self.options.lambda_ if self.options.lambda_ is not None else
                    DEFAULT_LAMBDA if nm is None else 1.0 / nm[1])
        target = self.config.sparsity
        if input_ids is None:
            raise ValueError("allocation='owl' needs calibration data.")
        probe = _OutlierProbe(self.config, m)
        run_sequential(model, probe, self.config, input_ids, progress=progress)
        blocks = sorted({mod.block for mod in modules})
        lod = [probe.ratios[b] for b in blocks]
        by_block = dict(zip(blocks, owl_block_sparsity(lod, target, lam)))
        info = {"M": m, "lambda": lam, "outlier_ratio": {str(b): probe.ratios[b] for b in blocks}}
        logger.info("OWL (M=%g, lambda=%g): block sparsities %s", m, lam,
                    ", ".join(f"{by_block[b]:.3f}" for b in blocks))
        if nm is not None:
            return self._allocate_nm(modules, by_block, lam, info)
        numel = [mod.numel for mod in modules]
        counts = fit_counts(numel, [by_block[mod.block] for mod in modules], num_pruned(sum(numel), target),
                            low=max(0.0, target - lam), high=min(1.0, target + lam))
        return allocation_from_counts(self.name, target, modules, counts, info)

    def _allocate_nm(self, modules, by_block: dict, lam: float, info: dict):
        """N:M: OWL's block ratios on the `N/M` lattice, inside the band `[s − λ, s + λ]` (lattice points
        `ceil((s−λ)·M) … floor((s+λ)·M)`, within `0 … M−1`), the budget met exactly (`fit_nm_steps`; the uniform `N` is
        in the band, so an exact choice always exists)."""
        n, mm = self.config.nm
        target = self.config.sparsity
        lo = max(0, math.ceil((target - lam) * mm - 1e-9))
        hi = min(mm - 1, math.floor((target + lam) * mm + 1e-9))
        groups = [mod.numel // mm for mod in modules]
        steps, exact = fit_nm_steps(groups, [by_block[mod.block] * mm for mod in modules], [lo] * len(modules),
                                    [hi] * len(modules), nm_budget([mod.numel for mod in modules], (n, mm)), uniform=n)
        if not exact:  # pragma: no cover - the uniform N is inside the band, so an exact choice exists
            raise RuntimeError("OWL N:M allocation missed its budget.")
        info["band"] = [f"{lo}:{mm}", f"{hi}:{mm}"]
        return nm_allocation(self.name, target, self.config.nm, modules, steps, info)
