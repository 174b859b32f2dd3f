"""User-supplied per-layer sparsity (`PruningConfig.layer_sparsity`): loading, validation, and exact fitting."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

from .base import Allocation, TargetModule, allocation_from_counts, fit_counts
from .nm import fit_nm_steps, nm_allocation, nm_budget
from ..methods.masks import nm_step, num_pruned

__all__ = ["OVERRIDE_TOLERANCE", "load_layer_sparsity", "check_override_names", "apply_override", "check_nm_override"]

logger = logging.getLogger(__name__)

# A complete override may miss the global target by this much (parameter-weighted mean sparsity); the counts are then
# fitted to the exact target by a common shift smaller than this.
OVERRIDE_TOLERANCE = 1e-3


def load_layer_sparsity(value: Union[None, str, os.PathLike, dict]) -> Optional[dict[str, float]]:
    """Reads `layer_sparsity` (a dict, or the path of a JSON object file) and checks names and ratios.

    Raises:
        ValueError: not a dict / JSON object, a name that is not a string, or a ratio outside `[0, 1)`.
    """
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ValueError(f"PruningConfig.layer_sparsity: no JSON file at {path!r} (pass a dict or a JSON path).")
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"PruningConfig.layer_sparsity: {path} is not valid JSON: {err}") from err
    if not isinstance(value, dict) or not value:
        raise ValueError(f"PruningConfig.layer_sparsity must be a non-empty dict (or JSON file) of module name → "
                         f"sparsity, got {value!r}.")
    out = {}
    for name, ratio in value.items():
        if not isinstance(name, str):
            raise ValueError(f"PruningConfig.layer_sparsity: module names must be strings, got {name!r}.")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"PruningConfig.layer_sparsity[{name!r}] must be a sparsity in [0, 1), got {ratio!r}.")
        out[name] = float(ratio)
    return out


def check_override_names(modules: list[TargetModule], override: dict[str, Any]) -> None:
    """Raises `ValueError` when `override` names a module that is not a pruned target."""
    known = {m.name for m in modules}
    unknown = sorted(set(override) - known)
    if unknown:
        sample = ", ".join(sorted(known)[:4])
        raise ValueError(f"PruningConfig.layer_sparsity names modules that are not pruned targets of this model: "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}. Use full module names such as {sample}.")


def apply_override(base: Allocation, modules: list[TargetModule], override: dict[str, Any]) -> Allocation:
    """Pins the listed modules to their ratios; the others keep the shape of `base`, shifted to meet the target.

    Raises:
        ValueError: an unknown module name, or a total that cannot meet the global target (a complete override off
            by more than `OVERRIDE_TOLERANCE`, or a partial one that leaves the other layers outside `[0, 1)`).
    """
    check_override_names(modules, override)
    if base.m is not None:
        return _apply_nm_override(base, modules, override)
    numel = [m.numel for m in modules]
    total = num_pruned(sum(numel), base.target)
    if len(override) == len(modules):
        mean = sum(num_pruned(m.numel, override[m.name]) for m in modules) / sum(numel)
        if abs(mean - base.target) > OVERRIDE_TOLERANCE:
            raise ValueError(f"PruningConfig.layer_sparsity: the per-layer sparsities average {mean:.4f} over the "
                             f"parameters, off the target sparsity {base.target:.4f} by more than "
                             f"{OVERRIDE_TOLERANCE} (set `sparsity` to the average or fix the ratios).")
        counts = fit_counts(numel, [override[m.name] for m in modules], total)
    else:
        fixed = {m.name: num_pruned(m.numel, override[m.name]) for m in modules if m.name in override}
        rest = [m for m in modules if m.name not in override]
        try:
            rest_counts = fit_counts([m.numel for m in rest], [base.sparsities[m.name] for m in rest],
                                     total - sum(fixed.values()))
        except ValueError as err:
            raise ValueError(f"PruningConfig.layer_sparsity: the {len(fixed)} listed layers leave the other "
                             f"{len(rest)} layers no way to meet the target sparsity {base.target:.4f} ({err})") from err
        by_name = dict(zip((m.name for m in rest), rest_counts), **fixed)
        counts = [by_name[m.name] for m in modules]
    info = dict(base.info, base=base.method, overridden=sorted(override))
    return allocation_from_counts("override" if base.method == "uniform" else f"{base.method}+override",
                                  base.target, modules, counts, info)


def check_nm_override(override: dict[str, float], nm: tuple[int, int], structure: str) -> None:
    """N:M runs: every override must be a multiple of `1/M` (a pattern `N_i:M`). Raises `ValueError` naming the
    offending modules and the allowed values (config time, before any model is loaded)."""
    bad = {}
    for name, ratio in override.items():
        try:
            nm_step(ratio, nm[1])
        except ValueError:
            bad[name] = ratio
    if bad:
        allowed = ", ".join(f"{k / nm[1]:g} ({k}:{nm[1]})" for k in range(nm[1]))
        shown = ", ".join(f"{k!r}: {v!r}" for k, v in list(bad.items())[:5])
        raise ValueError(f"PruningConfig.layer_sparsity with structure={structure!r}: every sparsity must be a multiple "
                         f"of 1/{nm[1]} (a per-layer N:{nm[1]} pattern); got {{{shown}}}"
                         f"{' ...' if len(bad) > 5 else ''}. Allowed: {allowed}.")


def _apply_nm_override(base: Allocation, modules: list[TargetModule], override: dict[str, Any]) -> Allocation:
    """N:M: the listed modules pinned to their patterns, the others' steps near `base`'s, the budget met exactly when
    any choice of steps can (else, for a partial override, the nearest achievable count below it; a complete override
    must meet it exactly)."""
    m = base.m
    numel = [mod.numel for mod in modules]
    n = nm_step(base.target, m)
    budget = nm_budget(numel, (n, m))
    pinned = {mod.name: nm_step(override[mod.name], m) for mod in modules if mod.name in override}
    desired = [pinned.get(mod.name, base.sparsities[mod.name] * m) for mod in modules]
    lo = [pinned.get(mod.name, 0) for mod in modules]
    hi = [pinned.get(mod.name, m - 1) for mod in modules]
    groups = [k // m for k in numel]
    if len(pinned) == len(modules):
        pruned = sum(g * p for g, p in zip(groups, desired))
        if pruned != budget:
            raise ValueError(f"PruningConfig.layer_sparsity: the per-layer N:{m} patterns prune {pruned} weights "
                             f"(mean sparsity {pruned / sum(numel):.4f}), not the {budget} of the uniform "
                             f"{base.target * m:.0f}:{m} budget; a complete N:M override must meet it exactly.")
    try:
        steps, exact = fit_nm_steps(groups, desired, lo, hi, budget, uniform=n)
    except ValueError as err:
        raise ValueError(f"PruningConfig.layer_sparsity: the {len(pinned)} listed layers leave the other "
                         f"{len(modules) - len(pinned)} layers no way to meet the N:{m} budget ({err})") from err
    info = dict(base.info, base=base.method, overridden=sorted(override))
    if not exact:
        pruned = sum(g * s for g, s in zip(groups, steps))
        logger.warning("layer_sparsity: no choice of N:%d patterns for the unlisted layers meets the budget of %d "
                       "pruned weights exactly; pruning %d (the nearest achievable count below it).", m, budget, pruned)
    method = "override" if base.method == "uniform" else f"{base.method}+override"
    return nm_allocation(method, base.target, (n, m), modules, steps, info)
