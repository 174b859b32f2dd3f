"""User-supplied per-layer sparsity (`PruningConfig.layer_sparsity`): loading, validation, and exact fitting."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from .base import Allocation, TargetModule, allocation_from_counts, fit_counts
from ..methods.masks import num_pruned

__all__ = ["OVERRIDE_TOLERANCE", "load_layer_sparsity", "check_override_names", "apply_override"]

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
