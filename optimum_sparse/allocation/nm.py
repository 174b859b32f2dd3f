"""Layer-wise N:M allocation: with M fixed by the structure (`"2:4"` → M = 4), every pruned linear gets its own
pattern `N_i:M`, `N_i ∈ {0, …, M−1}` (`N_i = 0`: the layer stays dense).

The budget is the uniform N:M count, `Σᵢ numelᵢ·N/M` (exact: every pruned linear's input size is a multiple of M). A
layer at `N_i:M` prunes `gᵢ·N_i` weights, `gᵢ = numelᵢ/M` its groups of M, so an allocation is integer steps `N_i`
with `Σ gᵢ·N_i` equal to the budget. `fit_nm_steps` finds them:

- **exactly** whenever some choice inside the per-layer bounds meets the budget (always for OWL and the search,
  whose bounds contain the uniform `N`);
- otherwise (only a partial `layer_sparsity` override can cause it: the pinned layers leave a remainder that the
  other layers' group sizes cannot add up to) the **largest achievable count not above** the budget, with a warning
  and `info["budget_gap"]`; a complete override must meet the budget exactly, and pins that exceed it even with every
  other layer dense are refused.

The search over the class sums is a small bounded knapsack: linears of equal size form a class, and the budget in
units of the groups' common divisor is reached by a bitset dynamic programme over the classes' step sums (a few
thousand bits for real models); each class sum is then spread over its members close to their desired `N_i`.
"""

from __future__ import annotations

import logging
import math
from functools import reduce
from typing import Optional, Sequence

from .base import Allocation, TargetModule, allocation_from_counts, fit_counts

__all__ = ["nm_budget", "fit_nm_steps", "steps_to_counts", "nm_allocation", "MAX_DP_BITS"]

logger = logging.getLogger(__name__)

# Above this many states the exact search is skipped (only when the linears' group sizes share a tiny common divisor):
# class sums are then kept at the uniform N when the bounds allow it (exact), else filled greedily (not above).
MAX_DP_BITS = 1 << 26


def nm_budget(numel: Sequence[int], nm: tuple[int, int]) -> int:
    """The uniform N:M pruned count `Σ numelᵢ // M · N` (integer arithmetic: no float rounding)."""
    n, m = nm
    return sum(k // m for k in numel) * n


def steps_to_counts(numel: Sequence[int], steps: Sequence[int], m: int) -> list[int]:
    """Pruned counts `numelᵢ // M · N_i` of per-layer steps `N_i`."""
    return [k // m * s for k, s in zip(numel, steps)]


def nm_allocation(method: str, target: float, nm: tuple[int, int], modules: Sequence[TargetModule],
                  steps: Sequence[int], info: Optional[dict] = None) -> Allocation:
    """The `Allocation` of per-layer steps `N_i` (sparsity `N_i / M`, pattern `N_i:M`) under the structure `nm`;
    `info["budget_gap"]` records the weights by which it falls short of the uniform N:M budget, if any."""
    info = dict(info or {})
    numel = [mod.numel for mod in modules]
    counts = steps_to_counts(numel, steps, nm[1])
    if sum(counts) != nm_budget(numel, nm):
        info["budget_gap"] = nm_budget(numel, nm) - sum(counts)
    return allocation_from_counts(method, target, modules, counts, info, m=nm[1])


def _spread(total: int, desired: Sequence[float], lo: Sequence[int], hi: Sequence[int]) -> list[int]:
    """Integers in `[loᵢ, hiᵢ]` summing to `total`, close to `desired` (one common shift, rounded; `fit_counts`)."""
    big = max(hi) + 1
    return fit_counts([big] * len(desired), [d / big for d in desired], total,
                      [a / big for a in lo], [b / big for b in hi])


def fit_nm_steps(groups: Sequence[int], desired: Sequence[float], lo: Sequence[int], hi: Sequence[int], total: int,
                 uniform: Optional[int] = None, max_bits: int = MAX_DP_BITS) -> tuple[list[int], bool]:
    """Integer steps `N_i ∈ [loᵢ, hiᵢ]` close to `desired` with `Σ groupsᵢ·N_i == total` when that is achievable.

    Args:
        groups: groups of M of each linear (`numelᵢ / M`): the weights one step of `N_i` removes.
        desired: the wanted (real) `N_i` of each linear.
        lo, hi: bounds of each `N_i` (equal for a pinned layer).
        total: the pruned-count budget.
        uniform: the uniform `N`; used when the exact search is too large (`max_bits`): every class then keeps the
            uniform sum, which is exact when all bounds contain it.
        max_bits: state limit of the exact search.

    Returns:
        `(steps, exact)`: `exact` is `True` when `Σ groupsᵢ·N_i == total`; otherwise the sum is the largest achievable
        one below `total` (nearest not above; with the greedy fallback, some sum not above).

    Raises:
        ValueError: a bound pair is empty, or even the lowest steps prune more than `total`.
    """
    n = len(groups)
    if any(a > b for a, b in zip(lo, hi)):
        raise ValueError("fit_nm_steps: a lower bound is above its upper bound.")
    lowest = sum(g * a for g, a in zip(groups, lo))
    if lowest > total:
        raise ValueError(f"Cannot meet the N:M budget of {total} pruned weights: the fixed or lowest per-layer patterns "
                         f"already prune {lowest}.")
    classes: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        classes.setdefault(g, []).append(i)
    sizes = list(classes)
    div = reduce(math.gcd, sizes)
    units = [g // div for g in sizes]
    low = [sum(lo[i] for i in classes[g]) for g in sizes]
    high = [sum(hi[i] for i in classes[g]) for g in sizes]
    want = [sum(min(max(desired[i], lo[i]), hi[i]) for i in classes[g]) for g in sizes]
    base = sum(u * a for u, a in zip(units, low))
    width = sum(u * (b - a) for u, a, b in zip(units, low, high))
    goal = min(total // div - base, width)  # offset (in units of `div`) of the wanted sum above the lowest one

    if width + 1 <= max_bits:
        reach = [1]
        for u, a, b in zip(units, low, high):
            prev, cur = reach[-1], 0
            for j in range(b - a + 1):
                cur |= prev << (u * j)
            reach.append(cur)
        best = (reach[-1] & ((1 << (goal + 1)) - 1)).bit_length() - 1  # the largest reachable offset <= goal
        sums, v = [0] * len(sizes), best
        for c in reversed(range(len(sizes))):
            u, a, b = units[c], low[c], high[c]
            options = [j for j in range(b - a + 1) if v - u * j >= 0 and (reach[c] >> (v - u * j)) & 1]
            j = min(options, key=lambda j: (abs(a + j - want[c]), j))
            sums[c], v = a + j, v - u * j
    else:
        logger.warning("N:M allocation: %d states for an exact budget search, more than %d; using the uniform class "
                       "sums or a greedy fill (the budget is then met or not exceeded).", width + 1, max_bits)
        members = [len(classes[g]) for g in sizes]
        if uniform is not None and all(a <= uniform * k <= b for a, b, k in zip(low, high, members)):
            sums = [uniform * k for k in members]
        else:
            sums = [min(max(math.floor(w), a), b) for w, a, b in zip(want, low, high)]
            target = total // div
            order = sorted(range(len(sizes)), key=lambda c: -units[c])
            for c in order:  # too many: lower the largest classes first
                excess = sum(u * s for u, s in zip(units, sums)) - target
                if excess > 0:
                    sums[c] -= min(sums[c] - low[c], -(-excess // units[c]))
            for c in order:  # room left: fill, largest classes first
                spare = target - sum(u * s for u, s in zip(units, sums))
                if spare > 0:
                    sums[c] += min(high[c] - sums[c], spare // units[c])
    steps = [0] * n
    for c, g in enumerate(sizes):
        idx = classes[g]
        for i, s in zip(idx, _spread(sums[c], [desired[i] for i in idx], [lo[i] for i in idx], [hi[i] for i in idx])):
            steps[i] = s
    pruned = sum(g * s for g, s in zip(groups, steps))
    assert pruned <= total, (pruned, total)
    return steps, pruned == total
