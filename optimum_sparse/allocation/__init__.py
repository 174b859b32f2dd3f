"""Layer-wise sparsity allocation: how the global sparsity target is split over the pruned linears.

`PruningConfig(allocation="uniform" | "owl" | "search", allocation_kwargs=..., layer_sparsity=...)`. Every allocator
returns an `Allocation` whose pruned-parameter count equals the global target exactly; `SparsePruner.apply` feeds
its per-module sparsity to the engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from ..config import register_config_check
from ..options import Options
from .base import (Allocation, Allocator, TargetModule, allocation_from_counts, available_allocators, fit_counts,
                   get_allocator, register_allocator, target_modules)
from .nm import fit_nm_steps, nm_allocation, nm_budget
from .override import OVERRIDE_TOLERANCE, apply_override, check_nm_override, check_override_names, load_layer_sparsity
from .owl import OWLAllocator
from .search import SEARCH_DEFAULTS, SearchAllocator, SearchOptions, StructuredSearchOptions, search_allocation
from .uniform import UniformAllocator

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

    from ..config import PruningConfig
    from ..methods.base import PruningMethod

__all__ = [
    "Allocation", "Allocator", "TargetModule", "allocation_from_counts", "available_allocators", "fit_counts",
    "get_allocator", "register_allocator", "target_modules", "OVERRIDE_TOLERANCE", "apply_override",
    "load_layer_sparsity", "OWLAllocator", "SEARCH_DEFAULTS", "SearchAllocator", "SearchOptions",
    "StructuredSearchOptions", "search_allocation",
    "UniformAllocator", "validate_allocation", "allocation_needs_calibration", "allocate", "fit_nm_steps",
    "nm_allocation", "nm_budget", "check_nm_override",
]

logger = logging.getLogger(__name__)


def validate_allocation(config: "PruningConfig") -> None:
    """Checks `allocation`, `allocation_kwargs` and `layer_sparsity` (loading a JSON path into a dict).

    Called by `PruningConfig.__post_init__`; module names are checked against the model in `allocate`.
    """
    if not isinstance(config.allocation, str):
        raise ValueError(f"PruningConfig.allocation must be one of {available_allocators()}, got {config.allocation!r}.")
    cls = get_allocator(config.allocation)
    if isinstance(config.allocation_kwargs, Options):  # the dataclass form: kept as the dict of its non-default keys
        config.allocation_kwargs = cls.options_from_config(config).to_kwargs()
    if not isinstance(config.allocation_kwargs, dict):
        raise ValueError(f"PruningConfig.allocation_kwargs must be a dict or the allocator's options dataclass, "
                         f"got {config.allocation_kwargs!r}.")
    config.layer_sparsity = load_layer_sparsity(config.layer_sparsity)
    if config.nm is not None and config.layer_sparsity:  # per-layer N_i:M patterns: multiples of 1/M
        check_nm_override(config.layer_sparsity, config.nm, config.structure)
    if config.layer_sparsity and config.allocation == "search":
        raise ValueError("PruningConfig.layer_sparsity cannot be combined with allocation='search' (the search chooses "
                         "every layer); use allocation='uniform' or 'owl'.")
    cls.validate_kwargs(config)


def allocation_needs_calibration(config: "PruningConfig") -> bool:
    return get_allocator(config.allocation).needs_calibration


def allocate(model: "nn.Module", config: "PruningConfig", method: "PruningMethod",
             input_ids: Optional["torch.Tensor"], progress: bool = True) -> Optional[Allocation]:
    """The run's allocation, or `None` for plain uniform pruning (the engine then uses `config.sparsity`).

    Runs before any weight changes: an unknown module in `layer_sparsity` or an unreachable target raises first.
    """
    if config.allocation == "uniform" and not config.layer_sparsity:
        return None
    modules = target_modules(model, config)
    override = config.layer_sparsity
    if override:
        check_override_names(modules, override)  # before the (slow) allocator runs
    allocation = get_allocator(config.allocation)(config).allocate(model, modules, method, input_ids, progress)
    if override:
        allocation = apply_override(allocation, modules, override)
    logger.info("Allocation %s: %d of %d parameters pruned (target %.4f)\n%s", allocation.method,
                allocation.pruned_params, allocation.total_params, config.sparsity, allocation.table())
    return allocation


register_config_check("allocation", validate_allocation)
