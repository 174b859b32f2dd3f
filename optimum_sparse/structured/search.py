"""Týr-the-Pruner-style search of the structured allocation: kept heads (KV groups) and MLP channels per block.

`PruningConfig(method=<structured method>, structure=..., allocation="search", allocation_kwargs={...})`.

- **Genes**: one per `ModuleBudget` (the heads, or the channels, of one block); a gene's value is a ladder level,
  its kept group count is `centre − level · step` (level `+1` is one step sparser).
- **Moves** (`evolution.mutate`): one level down on one gene and one level up on another of the same *class*: same
  kind and same parameters per level step (`step · cost`), so every child removes exactly as many parameters as its
  parent. Invariant: the removed parameters `Σ (groups − kept) · cost` of every candidate, and of the result, equal
  those of the start allocation, which is the output of `allocation.structured.allocate` (uniform, or the method's
  threshold/softmax rule), itself rounded by `round_to_budget` (or the uniform rule's common sizes) to within one
  module step of `sparsity × prunable parameters`.
- **Variants** (the supernet): every module pruned by the run's structured method (`method.select`: its own scores,
  supports and compensation) at each ladder level, block by block on the propagated calibration activations; stored
  per block as kept-group indices (int32), and only when the method changes them the compensated kept columns of
  the output projection (model dtype) and the bias delta (float32): never a dense copy.
- **Candidates** are applied by masking: the output projection's removed columns are zero, its kept columns hold the
  variant's weights, and a forward hook adds the variant's bias delta; the input projections stay dense (their
  removed rows are multiplied by zero columns), so the masked model computes what the shrunk model computes.
- **Scoring, evolution, rounds, resume**: `allocation.scoring.Scorer` and `allocation.evolution.EvolutionarySearch`,
  shared with the unstructured search (KL / hidden distance against the dense model, cached block activations,
  screening then full-set selection, strict elitism, coarse-to-fine steps, atomic state after every generation).

After the search the model holds its dense weights again; `run_structured` prunes it with the kept counts found
through the normal structured pass (`_prune_blocks`: compensation, physical shrinking).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from ..allocation.evolution import EvolutionarySearch, check_search_kwargs, run_search, search_info
from ..allocation.base import get_allocator
from ..allocation.search import STRUCTURED_INITS, StructuredSearchOptions, register_structured_search_check
from ..allocation.supernet import Supernet
from ..engine.block import BlockJob
from ..engine.devices import solve_device
from ..engine.sequential import capture_inputs, walk_blocks
from ..engine.linears import read_weight, write_weight
from ..allocation.structured import allocate, allocation_record
from .base import GroupDecision
from .latency import LatencyTable, load_latency_table
from .scoring import expand_groups


if TYPE_CHECKING:  # pragma: no cover
    from ..allocation.base import Allocation
    from .runner import StructuredPlan

__all__ = ["STRUCTURED_SEARCH_DEFAULTS", "STRUCTURED_INITS", "StructuredSupernet", "structured_search",
           "validate_structured_search"]

logger = logging.getLogger(__name__)

# The settings (`StructuredSearchOptions`) are the unstructured search's, with these differences: `init` is "uniform"
# (the uniform structured rule), "method" (the method's own rule: method_kwargs["allocation"] or its default, e.g.
# StructPrune's softmax), "threshold" or "softmax"; `step` is a fraction of each module's groups, rounded to whole steps
# (at least one KV group or `multiple_of` channels); `min_sparsity`/`max_sparsity` bound each module's removed fraction
# of groups (the module always keeps at least one step; a start allocation outside the bounds is kept, the search does
# not move further out). `budget`: "params" (every move keeps the removed parameters of the start allocation) or
# "latency" (every candidate's summed module latency at most the start allocation's; moves may trade heads against
# channels), with `latency_table` (given times instead of measuring) and `latency_repeats` (timed runs per measurement).
STRUCTURED_SEARCH_DEFAULTS = StructuredSearchOptions.defaults()


def _check_structured_search(options: StructuredSearchOptions, config) -> None:
    """The range and cross-field checks of a structured search's settings (`StructuredSearchOptions.check`)."""
    if getattr(config, "uniform_shapes", False):  # the heads/channels split search (structured.uniform_search)
        from .uniform_search import check_uniform_search_kwargs

        check_uniform_search_kwargs(config)
    kw = options.to_dict()
    check_search_kwargs(kw, STRUCTURED_INITS, config.sparsity, max_below_one=False)
    if kw["budget"] != "latency" and kw["latency_table"] is not None:
        raise ValueError("PruningConfig.allocation_kwargs['latency_table'] needs budget='latency'.")
    load_latency_table(kw["latency_table"])  # format checks; module names and counts are checked against the model
    repeats = kw["latency_repeats"]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"PruningConfig.allocation_kwargs['latency_repeats'] must be a positive integer, got {repeats!r}.")


def validate_structured_search(config) -> dict:
    """The search settings of a structured run: `StructuredSearchOptions` of `config.allocation_kwargs` (a dict of its
    keys), checked, as the dict of every key (the form `self.kw` of the search reads).

    Raises:
        ValueError: an unknown key or an invalid value, named with the allowed values.
    """
    options = get_allocator("search").options_from_config(config)
    options.check(config)
    return options.to_dict()


class StructuredSupernet(Supernet):
    """Variants of every module at kept counts `centre − level · step`, restricted to the module's allowed sizes.

    Args (beyond `Supernet`'s, with `numel` = groups and `kmin`/`kmax` = kept-count bounds):
        options: allowed kept counts of each module (`ModuleBudget.options()`).
        blocks: block index of each module.
    """

    def __init__(self, folder: str, names: list, groups: list, shapes: list, centres: list, steps: list, levels: int,
                 kmin: list, kmax: list, options: list, blocks: list):
        super().__init__(folder, names, groups, shapes, centres, steps, levels, kmin, kmax)
        self.options = [frozenset(o) for o in options]
        self.blocks = list(blocks)

    def count(self, gene: int, level: int) -> int:
        """Kept groups of `gene` at `level`."""
        return self.centres[gene] - level * self.steps[gene]

    def valid(self, gene: int, level: int) -> bool:
        return super().valid(gene, level) and self.count(gene, level) in self.options[gene]

    def store(self, gene: int, level: int, decision: GroupDecision, dtype: torch.dtype) -> tuple[dict, GroupDecision]:
        """The tensors that store `decision` and the decision as it reads back (weights rounded to `dtype`)."""
        key = f"{self.names[gene]}|{level}"
        tensors = {f"{key}|keep": decision.keep.to(torch.int32).cpu()}
        weight = bias = None
        if decision.weight is not None:
            tensors[f"{key}|weight"] = decision.weight.to(dtype).cpu()
            weight = tensors[f"{key}|weight"].to(torch.float32)
        if decision.bias_delta is not None:
            tensors[f"{key}|bias"] = bias = decision.bias_delta.to(torch.float32).cpu()
        return tensors, GroupDecision(keep=decision.keep.long().cpu(), weight=weight, bias_delta=bias)

    def decision(self, gene: int, level: int) -> GroupDecision:
        """The stored variant of `gene` at `level` (float32 weights on the CPU)."""
        from safetensors import safe_open

        key = f"{self.names[gene]}|{level}"
        with safe_open(self.block_file(self.blocks[gene]), "pt") as handle:
            keys = set(handle.keys())
            keep = handle.get_tensor(f"{key}|keep").long()
            weight = handle.get_tensor(f"{key}|weight").to(torch.float32) if f"{key}|weight" in keys else None
            bias = handle.get_tensor(f"{key}|bias") if f"{key}|bias" in keys else None
        return GroupDecision(keep=keep, weight=weight, bias_delta=bias)


class _StructuredSearch(EvolutionarySearch):
    """The search over a structured plan's modules; the output projections hold their dense weights between calls."""

    def __init__(self, model, plan: "StructuredPlan", method, config, input_ids, kw, folder, progress):
        super().__init__(model, plan.blocks, config, input_ids, kw, folder, progress)
        self.plan, self.method = plan, method
        self.modules = plan.modules
        self.names = plan.module_names()
        self.gene_of = {m.key: g for g, m in enumerate(self.modules)}
        self.outputs = [plan.blocks[m.key[0]].get_submodule(plan.names(m.key[1])[1]) for m in self.modules]
        self.widths = [plan.width(m.key[1]) for m in self.modules]
        self.dense = [read_weight(mod, torch.device("cpu")) for mod in self.outputs]
        self.deltas: list = [None] * len(self.modules)
        self.latency: Optional[LatencyTable] = None
        if kw["budget"] == "latency":
            self.latency = LatencyTable(plan, load_latency_table(kw["latency_table"]),
                                        kw["search_batch_size"] or config.batch_size, input_ids.shape[1],
                                        kw["latency_repeats"], os.path.join(folder, "latency.json"),
                                        solve_device(plan.blocks[0], config.device))

    def latency_budget(self) -> float:
        """Σ latency of the start allocation: no candidate may exceed it."""
        return self.latency.total(self.start)

    def mutate(self, genome, rng, net):
        """Parameter budget: the shared budget-neutral moves. Latency budget: each flip moves one step denser on one
        module and one step sparser on another (any kinds), kept only when the child's latency stays within the
        start allocation's (up to 64 random pairs tried per flip)."""
        if self.latency is None:
            return super().mutate(genome, rng, net)
        budget = self.latency_budget()
        child = list(genome)
        flips = min(rng.randint(1, self.kw["max_flips"]), rng.randint(1, self.kw["max_flips"]))
        genes = range(len(child))
        for _ in range(flips):
            down = [g for g in genes if net.valid(g, child[g] - 1)]
            up = [g for g in genes if net.valid(g, child[g] + 1)]
            if not down or not up:
                break
            for _ in range(64):
                a, b = down[rng.randrange(len(down))], up[rng.randrange(len(up))]
                if a == b:
                    continue
                trial = list(child)
                trial[a] -= 1
                trial[b] += 1
                if self.latency.total([net.count(g, lv) for g, lv in enumerate(trial)]) <= budget:
                    child = trial
                    break
        return child

    # ----- weights ---------------------------------------------------------------------------------------------------
    def active(self):
        return self.bias_hooks()

    @contextlib.contextmanager
    def bias_hooks(self) -> Iterator[None]:
        """Forward hooks adding each output projection's current bias delta (removed on exit)."""
        def make(g):
            def hook(module, args, output):
                delta = self.deltas[g]
                return output if delta is None else output + delta.to(output.device, output.dtype)
            return hook

        handles = [mod.register_forward_hook(make(g)) for g, mod in enumerate(self.outputs)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _masked(self, gene: int, decision: GroupDecision) -> torch.Tensor:
        dense = self.dense[gene]
        cols = expand_groups(decision.keep, self.widths[gene])
        weight = torch.zeros_like(dense)
        weight[:, cols] = decision.weight if decision.weight is not None else dense[:, cols]
        return weight

    def _apply(self, gene: int, weight: torch.Tensor, delta: Optional[torch.Tensor]) -> None:
        module = self.outputs[gene]
        write_weight(module, weight, self.names[gene])
        self.deltas[gene] = None if delta is None else delta.to(module.weight.device)

    def set_gene(self, net: StructuredSupernet, gene: int, level: int) -> None:
        decision = net.decision(gene, level)
        self._apply(gene, self._masked(gene, decision), decision.bias_delta)

    def restore_dense(self) -> None:
        for g in range(len(self.modules)):
            self._apply(g, self.dense[g], None)

    def gene_block(self, gene: int) -> int:
        return self.modules[gene].key[0]

    def classes_for(self, net: StructuredSupernet) -> list:
        by_cost: dict = {}
        for g, m in enumerate(self.modules):
            by_cost.setdefault((m.key[1], net.steps[g] * m.cost), []).append(g)
        return [genes for genes in by_cost.values() if len(genes) > 1]

    # ----- start -----------------------------------------------------------------------------------------------------
    def start_rule(self) -> str:
        return self.method.allocation if self.kw["init"] == "method" else self.kw["init"]

    def initial_centres(self) -> list:
        from .runner import _allocation_scores

        rule, config = self.start_rule(), self.config
        scores = None
        if rule != "uniform":
            inputs = capture_inputs(self.model, self.plan.blocks, self.input_ids, config.batch_size)
            scores = _allocation_scores(self.model, self.plan, self.method, config, inputs, self.progress)
        return allocate(rule, self.modules, config.sparsity, scores, config.method_kwargs.get("temperature", 1.0),
                        config.method_kwargs.get("max_deviation", 0.2))

    # ----- supernet --------------------------------------------------------------------------------------------------
    def build_supernet(self, rnd: int, centres: list) -> StructuredSupernet:
        kw = self.kw
        fraction = kw["step"] / (2 ** rnd)
        steps = [max(m.step, round(fraction * m.groups / m.step) * m.step) for m in self.modules]
        low = [m.groups - math.floor(kw["max_sparsity"] * m.groups + 1e-9) for m in self.modules]
        high = [m.groups - math.ceil(kw["min_sparsity"] * m.groups - 1e-9) for m in self.modules]
        kmin = [min(a, s) for a, s in zip(low, self.start)]
        kmax = [max(b, s) for b, s in zip(high, self.start)]
        net = StructuredSupernet(
            os.path.join(self.folder, f"round_{rnd}"), self.names, [m.groups for m in self.modules],
            [tuple(d.shape) for d in self.dense], centres, steps, kw["levels"], kmin, kmax,
            [m.options() for m in self.modules], [m.key[0] for m in self.modules])
        started = time.perf_counter()
        try:
            self._build(net, rnd)
        finally:
            self.restore_dense()
        logger.info("Structured supernet round %d: %d modules x up to %d levels, %.2f MB on disk, %.1fs.", rnd,
                    len(self.modules), 2 * kw["levels"] + 1, net.disk_bytes() / 1e6, time.perf_counter() - started)
        return net

    def _select(self, job, gene: int, keep: int, stats: dict) -> GroupDecision:
        from .runner import _collect

        m = self.modules[gene]
        if keep >= m.groups:
            return GroupDecision(keep=torch.arange(m.groups))
        kind, module = m.key[1], self.outputs[gene]
        if gene not in stats:  # the module's input statistics, on the current (forward) weights of the block
            stats[gene] = _collect(job, {kind: module}, self.method.stats == "hessian")[kind]
        bias = module.bias.detach().to(job.device, torch.float32) if getattr(module, "bias", None) is not None else None
        decision = self.method.select(kind, self.dense[gene].to(job.device), bias, stats[gene], self.widths[gene], keep)
        if len(decision.keep) != keep:
            raise RuntimeError(f"{self.config.method} kept {len(decision.keep)} groups, asked {keep}.")
        return decision

    def _forward(self, net: StructuredSupernet, gene: int, variants: dict) -> None:
        """Writes the weight the next modules and blocks are calibrated on (`accumulation`)."""
        mode = self.kw["accumulation"]
        if mode == "none" or not variants:
            return
        if mode == "centre":
            level = 0 if 0 in variants else min(variants, key=abs)
            self._apply(gene, self._masked(gene, variants[level]), variants[level].bias_delta)
            return
        # Týr's expectation: Σ (1−sₗ) Wₗ / Σ (1−sₗ), with sₗ the removed fraction of the module's groups
        share = {lv: net.count(gene, lv) / net.numel[gene] for lv in variants}
        total = sum(share.values())
        weight = sum(w * self._masked(gene, variants[lv]) for lv, w in share.items()) / total
        deltas = [(w, variants[lv].bias_delta) for lv, w in share.items() if variants[lv].bias_delta is not None]
        delta = sum(w * d for w, d in deltas) / total if deltas else None
        self._apply(gene, weight, delta)

    @torch.no_grad()
    def _build(self, net: StructuredSupernet, rnd: int) -> None:
        plan, config = self.plan, self.config
        inputs = capture_inputs(self.model, plan.blocks, self.input_ids, config.batch_size)

        def visit(job: BlockJob) -> None:
            cached = net.has_block(job.index)
            tensors: dict = {}
            for kind in plan.kinds:  # heads first: the MLP's statistics see the attention's forward weight
                gene = self.gene_of[(job.index, kind)]
                variants, stats = {}, {}
                for level in net.gene_levels(gene):
                    if cached:
                        variants[level] = net.decision(gene, level)
                        continue
                    decision = self._select(job, gene, net.count(gene, level), stats)
                    stored, variants[level] = net.store(gene, level, decision, self.outputs[gene].weight.dtype)
                    tensors.update(stored)
                self._forward(net, gene, variants)
            if not cached:
                net.save_block(job.index, tensors)

        walk_blocks(self.model, plan.blocks, plan.spec, config, inputs, visit,
                    desc=f"Supernet round {rnd} ({config.method})", progress=self.progress)


def _latency_info(search: "_StructuredSearch", plan, kept: list, start: list) -> dict:
    """What `info["latency"]` records: the start (budget) and achieved latency, per module, and the measurements."""
    table = search.latency
    names = plan.module_names()
    return {"source": table.source, "device": str(table.device), "batch": [table.batch, table.seq_len],
            "repeats": table.repeats, "start_latency": table.total(start), "achieved_latency": table.total(kept),
            "per_module": {n: {"start": table(g, s), "result": table(g, k)}
                           for g, (n, s, k) in enumerate(zip(names, start, kept))},
            "measured": table.measured_rows()}


def _removed(modules, kept: list) -> int:
    return sum((m.groups - k) * m.cost for m, k in zip(modules, kept))


def structured_search(model, plan: "StructuredPlan", method, config, input_ids: Optional[torch.Tensor],
                      progress: bool = True, stop_after: Optional[int] = None) -> Optional["Allocation"]:
    """Runs (or resumes) the structured search; returns its `Allocation`, or `None` when `stop_after` generations ran.

    The `Allocation` has one entry per module (`"<blocks>.<i>.heads"` / `".channels"`: the fraction of its
    parameters removed); `info["structured"]` holds the kept group counts (`kept_groups`, the input of
    `_prune_blocks`), the start allocation's (`start_kept_groups`), the budget and the removed parameters.

    Args:
        model: the dense model (holds its dense weights again when this returns or raises).
        plan: `plan_structured(model, config)`.
        method: the structured method (builds the variants with its own `select`).
        config: the `PruningConfig` (`allocation="search"`, settings in `allocation_kwargs`).
        input_ids: calibration ids `[n, seq_len]`; the first `search_samples` also score the candidates.
        stop_after: stop after this many generations in this call (the state on disk lets a rerun resume).
    """
    kw = validate_structured_search(config)
    if input_ids is None:
        raise ValueError("allocation='search' needs calibration data.")
    names = plan.module_names()
    search, state = run_search(
        model, lambda folder: _StructuredSearch(model, plan, method, config, input_ids, kw, folder, progress),
        {"method": config.method, "structure": config.structure, "sparsity": config.sparsity,
         "multiple_of": config.multiple_of, "damping": config.damping, "method_kwargs": config.method_kwargs,
         "modules": [(n, m.groups, m.cost, m.step, m.params) for n, m in zip(names, plan.modules)]},
        kw, input_ids, stop_after)
    if state is None:
        return None
    kept, start = state["centres"], state["start"]
    info = search_info(kw, state)
    info.pop("latency_table", None)
    info["init_rule"] = search.start_rule()
    if search.latency is None:
        if _removed(plan.modules, kept) != _removed(plan.modules, start):  # pragma: no cover - budget-neutral moves
            raise RuntimeError(f"Structured search lost the budget: {_removed(plan.modules, kept)} parameters removed "
                               f"instead of {_removed(plan.modules, start)}.")
    else:
        info["latency"] = _latency_info(search, plan, kept, start)
        if info["latency"]["achieved_latency"] > info["latency"]["start_latency"]:  # pragma: no cover - every move
            raise RuntimeError("Structured search exceeded its latency budget.")
    return allocation_record("search", plan, config.sparsity, kept, info, start=start)


register_structured_search_check(_check_structured_search)
