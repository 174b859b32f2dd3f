"""Uniform allocation: every pruned linear gets the global target (today's default)."""

from __future__ import annotations

from .base import Allocator, allocation_from_counts, fit_counts, register_allocator
from .nm import steps_to_counts
from ..methods.masks import num_pruned

__all__ = ["UniformAllocator", "uniform_counts"]


def uniform_counts(modules, target: float, nm=None) -> list[int]:
    """Exact pruned counts for a uniform target: `floor(numelᵢ·s)` each, plus the few weights the global count
    `floor(Σ numelᵢ·s)` still needs, one per layer (N:M, `nm` given: `numelᵢ/M · N` each, exactly the budget)."""
    numel = [m.numel for m in modules]
    if nm is not None:
        return steps_to_counts(numel, [nm[0]] * len(numel), nm[1])
    return fit_counts(numel, [target] * len(numel), num_pruned(sum(numel), target))


@register_allocator
class UniformAllocator(Allocator):
    """Every target linear pruned at `config.sparsity` (the global count made exact to the weight)."""

    name = "uniform"

    def allocate(self, model, modules, method, input_ids, progress=True):
        nm = self.config.nm
        return allocation_from_counts(self.name, self.config.sparsity, modules,
                                      uniform_counts(modules, self.config.sparsity, nm), m=nm[1] if nm else None)
