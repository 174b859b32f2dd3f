"""The structured search under `uniform_shapes=True`: which split of the budget between heads and channels.

With the same kept counts in every block, an allocation is one common count per structure kind, and the budget
fixes the channel count once the head count is chosen. The search therefore tries every allowed common number of
KV groups (at most the model's KV heads per block), gives the channels the common count closest to the budget, prunes
a copy of the model with the run's method for each candidate (the method's own selection and compensation, block by
block on propagated activations) and scores it against the dense model (`allocation.scoring.Scorer`: KL to the dense
next-token distribution and/or block-output distance, on the first `search_samples` calibration windows). The
best-scoring split is returned; the model itself is pruned afterwards by `run_structured`.

Settings (`allocation_kwargs`, `StructuredSearchOptions`): `fitness`, `kl_topk`, `hidden_weight`, `search_samples`,
`search_batch_size`, as in the search; the evolutionary settings do not apply and are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import torch

from ..allocation.scoring import Scorer
from ..allocation.search import StructuredSearchOptions
from ..allocation.structured import allocation_record
from ..engine.sequential import capture_inputs
from ..engine.sequential import PruningReport

if TYPE_CHECKING:  # pragma: no cover
    from ..allocation.base import Allocation
    from .runner import StructuredPlan

__all__ = ["UNIFORM_SEARCH_KEYS", "uniform_shapes_search", "split_candidates"]

logger = logging.getLogger(__name__)

UNIFORM_SEARCH_KEYS = ("fitness", "kl_topk", "hidden_weight", "search_samples", "search_batch_size")


def check_uniform_search_kwargs(config) -> dict:
    """The `StructuredSearchOptions` of `config` as a dict, refusing the keys that do not apply to this search."""
    unknown = sorted(set(config.allocation_kwargs) - set(UNIFORM_SEARCH_KEYS))
    if unknown:
        raise ValueError(f"PruningConfig.allocation_kwargs: {unknown} do not apply to allocation='search' with "
                         f"uniform_shapes=True (it tries every heads/channels split); allowed: {list(UNIFORM_SEARCH_KEYS)}.")
    return StructuredSearchOptions.from_kwargs(config.allocation_kwargs, "allocation='search'").to_dict()


def split_candidates(modules: list, sparsity: float) -> list[list[int]]:
    """Kept counts of every candidate split: each allowed common KV-group count, with the common channel count that
    brings the removed parameters closest to the budget (a candidate must come within one channel step per block
    of the budget). With one structure kind, the single common count closest to the budget."""
    budget = sparsity * sum(m.params for m in modules)
    kinds: dict = {}
    for j, m in enumerate(modules):
        kinds.setdefault(m.key[1], []).append(j)
    last = list(kinds)[-1]
    first = [k for k in kinds if k != last]
    options = [modules[kinds[k][0]].options() for k in first]
    out = []
    for counts in ([[]] if not first else [[o] for o in options[0]]):
        removed = sum((modules[kinds[k][0]].groups - c) * modules[kinds[k][0]].cost * len(kinds[k])
                      for k, c in zip(first, counts))
        js = kinds[last]
        m = modules[js[0]]
        keep = min(m.options(), key=lambda k: abs(budget - removed - (m.groups - k) * m.cost * len(js)))
        total = removed + (m.groups - keep) * m.cost * len(js)
        if abs(total - budget) > m.step * m.cost * len(js):
            continue
        kept = [0] * len(modules)
        for k, c in zip(first, counts):
            for j in kinds[k]:
                kept[j] = c
        for j in js:
            kept[j] = keep
        out.append(kept)
    return out


@torch.no_grad()
def uniform_shapes_search(model, plan: "StructuredPlan", method, config, input_ids, progress: bool) -> "Allocation":
    """Scores every split of `split_candidates` on a pruned copy; returns the best as an `Allocation`."""
    from .runner import StructuredPlan, _prune_blocks

    kw = check_uniform_search_kwargs(config)
    if input_ids is None:
        raise ValueError("allocation='search' needs calibration data.")
    candidates = split_candidates(plan.modules, config.sparsity)
    if not candidates:  # pragma: no cover - check_feasible and the rounding leave at least one
        raise ValueError("uniform_shapes=True: no common heads/channels split meets the budget.")
    started = time.perf_counter()
    batches = list(input_ids[: kw["search_samples"]].split(kw["search_batch_size"] or config.batch_size))
    scorer = Scorer(model, plan.blocks, batches, kw["fitness"], kw["kl_topk"], kw["hidden_weight"])
    plain = dataclasses.replace(config, allocation="uniform", allocation_kwargs={})
    rows = []
    for kept in candidates:
        candidate = copy.deepcopy(model)
        cplan = StructuredPlan(candidate, plain)
        inputs = capture_inputs(candidate, cplan.blocks, input_ids, config.batch_size)
        _prune_blocks(candidate, cplan, method, plain, inputs, {m.key: k for m, k in zip(cplan.modules, kept)},
                      PruningReport(method=config.method),
                      False)
        scorer.model, scorer.blocks = candidate, cplan.blocks
        fitness = scorer.score(0, list(range(len(batches))))
        counts = {m.key[1]: k for m, k in zip(plan.modules, kept)}
        rows.append({"kept": counts, "removed_params": sum((m.groups - k) * m.cost for m, k in zip(plan.modules, kept)),
                     "fitness": fitness})
        logger.info("uniform_shapes split %s: fitness %.5f", counts, fitness)
        del candidate
    scorer.model, scorer.blocks = model, plan.blocks
    best = min(range(len(rows)), key=lambda i: rows[i]["fitness"])
    info = {"uniform_shapes": True, "candidates": rows, "fitness": kw["fitness"], "search_samples": sum(len(b) for b in batches),
            "seconds": time.perf_counter() - started, "best": best}
    return allocation_record("search", plan, config.sparsity, candidates[best], info)
