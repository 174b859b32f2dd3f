"""Uniform allocation: every pruned linear gets the global target (today's default)."""

from __future__ import annotations

from .base import Allocator, allocation_from_counts, fit_counts, register_allocator
from ..methods.masks import num_pruned

__all__ = ["UniformAllocator", "uniform_counts"]


def uniform_counts(modules, target: float) -> list[int]:
    """Exact pruned counts for a uniform target: `floor(numelᵢ·s)` each, plus the few weights the global count
    `floor(Σ numelᵢ·s)` still needs, one per layer."""
    numel = [m.numel for m in modules]
    return fit_counts(numel, [target] * len(numel), num_pruned(sum(numel), target))


@register_allocator
class UniformAllocator(Allocator):
    """Every target linear pruned at `config.sparsity` (the global count made exact to the weight)."""

    name = "uniform"

    def allocate(self, model, modules, method, input_ids, progress=True):
        return allocation_from_counts(self.name, self.config.sparsity, modules,
                                      uniform_counts(modules, self.config.sparsity))
