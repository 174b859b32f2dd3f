"""Structured allocation: how many groups (KV groups, MLP channels) each module keeps: uniform, closed-form
threshold, or softmax-energy allocation, and the common sizes of `uniform_shapes`.

The one home of the structured allocation rules (`optimum_sparse.structured.allocation` re-exports them); the
structured search (`optimum_sparse.structured.search`) starts from them.

A *module* is one structure kind of one block (the heads of block 3, the MLP channels of block 3). The budget is
`sparsity × (parameters of the prunable linears)`; every rule ends with `round_to_budget`, which rounds each
module's kept count to the allowed sizes (multiples of `multiple_of` channels, whole KV groups, at least one step
kept) and then moves single steps between modules until the removed parameters are as close to the budget as the
rounding allows. See docs/structured.md for the derivation of the threshold and softmax rules.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ModuleBudget", "round_to_budget", "uniform_allocation", "pooled_common_sizes", "same_shapes_per_kind", "threshold_allocation", "softmax_allocation",
           "check_feasible", "allocate", "allocation_record"]

logger = logging.getLogger(__name__)


@dataclass
class ModuleBudget:
    """One prunable module.

    Attributes:
        key: `(block index, kind)`.
        groups: number of groups (channels or KV groups) now.
        cost: parameters removed with one group (rows of the input projections and their biases, output columns).
        step: kept counts must be multiples of `step` groups (or all groups).
        params: parameters of the module's linears (the denominator of its sparsity).
    """

    key: tuple
    groups: int
    cost: int
    step: int
    params: int

    def options(self) -> list[int]:
        """Allowed kept counts, ascending."""
        kept = [m * self.step for m in range(1, (self.groups - 1) // self.step + 1)]
        return kept + [self.groups]

    @property
    def max_removed(self) -> int:
        return (self.groups - self.options()[0]) * self.cost


def check_feasible(modules: list[ModuleBudget], budget: float, sparsity: float, structure: str) -> None:
    """Raises `ValueError` when the budget asks to remove more than the modules can give."""
    most = sum(m.max_removed for m in modules)
    if budget > most * (1 + 1e-9):
        total = sum(m.params for m in modules)
        raise ValueError(
            f"PruningConfig.sparsity={sparsity} asks to remove {budget / total:.1%} of the prunable parameters "
            f"(structure={structure!r}), more heads/channels than exist: every layer keeps at least one KV group and "
            f"`multiple_of` channels, so at most {most / total:.1%} can be removed. Lower the sparsity or "
            "`multiple_of`, or add the other structure kind."
        )


def round_to_budget(modules: list[ModuleBudget], desired_removed: list[float], budget: float) -> list[int]:
    """Kept group counts: each module rounded to its nearest allowed size, then single-step moves (the module
    furthest from its wish first) while they bring the removed parameters closer to `budget`."""
    options = [m.options() for m in modules]
    wish = [m.groups - min(max(r, 0.0), m.groups) for m, r in zip(modules, desired_removed)]
    index = [min(range(len(opts)), key=lambda i: abs(opts[i] - w)) for opts, w in zip(options, wish)]

    def removed() -> float:
        return sum((m.groups - opts[i]) * m.cost for m, opts, i in zip(modules, options, index))

    diff = budget - removed()
    while True:
        best, best_pref = None, None
        for j, (m, opts) in enumerate(zip(modules, options)):
            for move in (-1, 1):  # -1: keep fewer (remove more)
                k = index[j] + move
                if not 0 <= k < len(opts):
                    continue
                gain = (opts[index[j]] - opts[k]) * m.cost  # removed params added by the move
                if abs(diff - gain) >= abs(diff) - 1e-9:
                    continue
                pref = (opts[index[j]] - wish[j]) / m.groups * (1 if move < 0 else -1)
                if best_pref is None or pref > best_pref:
                    best, best_pref = (j, k, gain), pref
        if best is None:
            break
        j, k, gain = best
        index[j] = k
        diff -= gain
    return [opts[i] for opts, i in zip(options, index)]


def uniform_allocation(modules: list[ModuleBudget], sparsity: float) -> list[int]:
    """The same kept size in every block (so the stock config can describe the model), per structure kind.

    The coarse kind (KV groups) is rounded to the nearest count; the last kind (MLP channels) then takes the
    common size that brings the removed parameters closest to the budget. Modules of one kind with different sizes
    (an already pruned model) fall back to `round_to_budget`.
    """
    budget = sparsity * sum(m.params for m in modules)
    kinds = _kinds(modules)
    if not same_shapes_per_kind(modules):
        return round_to_budget(modules, [sparsity * m.params / m.cost for m in modules], budget)
    return _common_sizes(modules, budget, {kind: sparsity * modules[js[0]].params / modules[js[0]].cost
                                           for kind, js in kinds.items()})


def _kinds(modules: list[ModuleBudget]) -> dict:
    kinds: dict = {}
    for j, m in enumerate(modules):
        kinds.setdefault(m.key[1], []).append(j)
    return kinds


def same_shapes_per_kind(modules: list[ModuleBudget]) -> bool:
    """Whether every module of a kind has the same groups, step and cost (a model not yet pruned per layer)."""
    return all(len({(modules[j].groups, modules[j].step, modules[j].cost) for j in js}) == 1
               for js in _kinds(modules).values())


def _common_sizes(modules: list[ModuleBudget], budget: float, removed_wish: dict) -> list[int]:
    """One kept count per kind: the nearest allowed count to `groups − removed_wish[kind]` for every kind but the
    last, and for the last the count that brings the removed parameters closest to `budget`."""
    kinds = _kinds(modules)
    keeps = [0] * len(modules)
    removed = 0.0
    names = list(kinds)
    for position, kind in enumerate(names):
        js = kinds[kind]
        m = modules[js[0]]
        if position < len(names) - 1:
            wish = m.groups - removed_wish[kind]
            keep = min(m.options(), key=lambda k: abs(k - wish))
        else:
            keep = min(m.options(), key=lambda k: abs(budget - removed - (m.groups - k) * m.cost * len(js)))
        removed += (m.groups - keep) * m.cost * len(js)
        for j in js:
            keeps[j] = keep
    return keeps


def pooled_common_sizes(modules: list[ModuleBudget], keeps: list[int], sparsity: float) -> list[int]:
    """`uniform_shapes`: the same kept count in every block, per kind, from a per-module allocation `keeps`.

    The rule's removed groups of each kind are pooled over the blocks (their mean per block is the kind's wish), so
    the rule decides how the budget splits between heads and channels while every block keeps the same sizes; the
    last kind then takes the common count closest to the budget (as the uniform rule does).
    """
    kinds = _kinds(modules)
    wish = {kind: sum(modules[j].groups - keeps[j] for j in js) / len(js) for kind, js in kinds.items()}
    return _common_sizes(modules, sparsity * sum(m.params for m in modules), wish)


def threshold_allocation(modules: list[ModuleBudget], scores: list[torch.Tensor], sparsity: float) -> list[int]:
    """The closed-form rule: one global threshold τ on the comparable group scores; a module loses exactly its
    groups scoring below τ, and τ is the smallest value whose removed parameters reach the budget (cheapest
    groups first, at least one step kept per module)."""
    budget = sparsity * sum(m.params for m in modules)
    entries = sorted((float(s), j) for j, sc in enumerate(scores) for s in sc.flatten().tolist())
    removed = [0] * len(modules)
    limit = [m.groups - m.options()[0] for m in modules]
    total = 0.0
    for _, j in entries:
        if total >= budget:
            break
        if removed[j] < limit[j]:
            removed[j] += 1
            total += modules[j].cost
    return round_to_budget(modules, [float(r) for r in removed], budget)


def softmax_allocation(modules: list[ModuleBudget], scores: list[torch.Tensor], sparsity: float,
                       temperature: float = 1.0, max_deviation: float = 0.2) -> list[int]:
    """Softmax-energy allocation: module sparsity `s_m ∝ exp(−z_m / T)`, clipped to `sparsity ± max_deviation`
    and normalised (bisection on the scale) so the removed parameters meet the budget.

    `z_m` is the standardised log-energy of module `m`: the mean comparable score of the groups a uniform ratio
    would remove there (what the module loses per removed parameter). `T → ∞` gives the uniform rule.
    """
    budget = sparsity * sum(m.params for m in modules)
    energies = []
    for m, sc in zip(modules, scores):
        k = max(1, round(sparsity * m.groups))
        low = torch.sort(sc.flatten().to(torch.float64)).values[:k]
        energies.append(math.log(float(low.mean().clamp_min(1e-30))))
    e = torch.tensor(energies, dtype=torch.float64)
    z = (e - e.mean()) / e.std() if len(e) > 1 and float(e.std()) > 0 else torch.zeros_like(e)
    weights = torch.exp(-z / temperature)
    params = torch.tensor([m.params for m in modules], dtype=torch.float64)
    hi = torch.tensor([min(sparsity + max_deviation, m.max_removed / m.params) for m in modules], dtype=torch.float64)
    lo = torch.minimum(torch.full_like(hi, max(sparsity - max_deviation, 0.0)), hi)

    def fractions(scale: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(scale * weights, lo), hi)

    a, b = 0.0, 1.0
    while float((fractions(b) * params).sum()) < budget and b < 1e12:
        b *= 2
    for _ in range(100):
        mid = (a + b) / 2
        if float((fractions(mid) * params).sum()) < budget:
            a = mid
        else:
            b = mid
    frac = fractions(b)
    logger.debug("softmax allocation: %s", [round(float(f), 3) for f in frac])
    return round_to_budget(modules, [float(f) * m.params / m.cost for f, m in zip(frac, modules)], budget)


def allocate(rule: str, modules: list[ModuleBudget], sparsity: float, scores: Optional[list[torch.Tensor]] = None,
             temperature: float = 1.0, max_deviation: float = 0.2) -> list[int]:
    """Kept group counts per module under `rule` (`"uniform"`, `"threshold"`, `"softmax"`)."""
    if rule == "uniform" or sparsity == 0:
        return uniform_allocation(modules, sparsity)
    if scores is None:
        raise ValueError(f"Allocation {rule!r} needs group scores.")
    if rule == "threshold":
        return threshold_allocation(modules, scores, sparsity)
    return softmax_allocation(modules, scores, sparsity, temperature, max_deviation)


def allocation_record(rule: str, plan, sparsity: float, kept: list, info: Optional[dict] = None,
                      start: Optional[list] = None):
    """The `optimum_sparse.allocation.Allocation` of a structured run (what the report and the model card show).

    One entry per module (`plan.module_names()`), its sparsity the fraction of the module's parameters removed;
    `info["structured"]` holds the kept group counts and fractions, the budget (`sparsity × prunable parameters`)
    and the parameters removed (within one module step of the budget: whole KV groups and `multiple_of` channels).
    """
    from .base import Allocation

    names = plan.module_names()
    removed = {n: (m.groups - k) * m.cost for n, m, k in zip(names, plan.modules, kept)}
    structured = {
        "budget": sparsity * sum(m.params for m in plan.modules),
        "removed_params": sum(removed.values()),
        "prunable_params": sum(m.params for m in plan.modules),
        "groups": {n: m.groups for n, m in zip(names, plan.modules)},
        "kept_groups": dict(zip(names, kept)),
        "kept_fraction": {n: k / m.groups for n, m, k in zip(names, plan.modules, kept)},
    }
    if start is not None:
        structured["start_kept_groups"] = dict(zip(names, start))
        structured["start_removed_params"] = sum((m.groups - k) * m.cost for m, k in zip(plan.modules, start))
    return Allocation(method=rule, target=sparsity,
                      sparsities={n: removed[n] / m.params for n, m in zip(names, plan.modules)},
                      numel={n: m.params for n, m in zip(names, plan.modules)},
                      info={**(info or {}), "structured": structured})
