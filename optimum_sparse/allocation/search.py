"""Týr-the-Pruner-style search of the sparsity distribution (Li et al., NeurIPS 2025; EvoPress, ICML 2025).

Each round builds a supernet (every target linear pruned with the chosen local method at a ladder of pruned counts
around its current centre, error accumulated through the expected weights, variants stored as bit masks), then runs
an elitist (1+λ) evolutionary search: children move one ladder step of pruned weights from one linear to another of
the same size (the global parameter count never changes), are screened on part of the search set, and the survivors
are scored on all of it against the parent; a child replaces the parent only when strictly better. The next round
re-centres on the best distribution with half the step (coarse to fine). The state is saved after every generation
(atomically), and a rerun with the same `state_dir` resumes exactly where the last one stopped.

Improvements over the published code: masks instead of dense copies on disk, expectation error accumulation that
actually runs, per-linear genes for any architecture (GQA, fused projections), block-wise scoring from cached
activations, a fixed search set (fitness is deterministic, so the parent's fitness never increases), and resume.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..engine.architectures import find_blocks, get_architecture
from ..engine.devices import is_offloaded
from ..engine.linears import read_weight, write_weight
from ..engine.sequential import check_targets, run_sequential
from ..methods.base import PruningMethod, get_method_class
from ..methods.masks import num_pruned
from ..options import Options, option
from .base import Allocator, allocation_from_counts, fit_counts, register_allocator
from .evolution import EvolutionarySearch, check_search_kwargs, mutate, run_search, search_info
from .nm import fit_nm_steps, nm_budget, steps_to_counts
from .owl import OWLAllocator
from .supernet import Supernet, SupernetBuilder
from .uniform import uniform_counts

__all__ = ["SearchAllocator", "SearchOptions", "StructuredSearchOptions", "search_allocation", "SEARCH_DEFAULTS",
           "STRUCTURED_BUDGETS", "STRUCTURED_INITS", "mutate"]

logger = logging.getLogger(__name__)

STRUCTURED_INITS = ("uniform", "method", "threshold", "softmax")  # start rules of the structured search
STRUCTURED_BUDGETS = ("params", "latency")  # what every structured candidate keeps equal to the start allocation

# Structured runs search their own genes (heads/channels); their settings check lives with that search
# (`optimum_sparse.structured.search`), which registers it here on import (structured sits above allocation).
_STRUCTURED_SEARCH_CHECK = None


@dataclass
class _EvolutionOptions(Options):
    """The settings both searches share (unstructured/N:M per-linear genes, structured heads/channels genes)."""

    kind = "allocation_kwargs"

    init: str = option("uniform", "Starting distribution: 'uniform' or 'owl' (OWL's, with its default M and lambda).")
    levels: int = option(2, "Ladder variants on each side of the centre.")
    step: float = option(0.05, "First-round step, as a fraction of each linear; halved every round.")
    rounds: int = option(2, "Coarse-to-fine rounds (a supernet each).")
    generations: int = option(20, "Generations per round.")
    offspring: int = option(16, "Children per generation.")
    survivors: int = option(4, "Children kept after the first screening stage.")
    screen_fraction: float = option(0.25, "Share of the search set used for the screening stage.")
    max_flips: int = option(3, "A child makes min(U{1..F}, U{1..F}) budget-neutral moves.")
    fitness: str = option("kl", "'kl', 'hidden' or 'kl+hidden'.")
    kl_topk: int = option(512, "Teacher tokens per position for the KL.")
    hidden_weight: float = option(1.0, "Weight of the hidden-state term in 'kl+hidden'.")
    search_samples: Optional[int] = option(None, "Calibration sequences used to score candidates (default: all).")
    search_batch_size: Optional[int] = option(None, "Sequences per scoring forward (default: the config's batch_size).")
    accumulation: str = option("expectation", "'expectation', 'centre' or 'none' while building the supernet.")
    min_sparsity: float = option(0.0, "Lower bound of every linear's sparsity.")
    max_sparsity: float = option(0.95, "Upper bound of every linear's sparsity.")
    state_dir: Optional[str] = option(None, "Folder of the resumable state (default: a temporary folder, no resume).")
    keep_supernet: bool = option(False, "Keep the variant files when the search ends.")


@dataclass
class SearchOptions(_EvolutionOptions):
    """`allocation_kwargs` of `allocation="search"` (unstructured and N:M runs; structured runs take
    `StructuredSearchOptions`)."""

    label = "search"

    def check(self, config) -> None:
        _validate(config, self.to_dict())


@dataclass
class StructuredSearchOptions(_EvolutionOptions):
    """`allocation_kwargs` of `allocation="search"` in a structured run (heads/channels kept per block,
    `optimum_sparse.structured.search`): the settings of `SearchOptions` with other defaults for `init`, `step` and
    `max_sparsity`, and the budget kind. Under `uniform_shapes=True` only `fitness`, `kl_topk`, `hidden_weight`,
    `search_samples` and `search_batch_size` apply (the others are refused)."""

    label = "structured search"

    init: str = option("uniform", "Starting allocation: 'uniform', 'method' (the method's own rule), 'threshold' or "
                                  "'softmax'.")
    step: float = option(0.1, "First-round step, as a fraction of each module's groups (whole steps of one KV group "
                              "or multiple_of channels); halved every round.")
    max_sparsity: float = option(1.0, "Upper bound of every module's removed fraction of groups (a module always "
                                      "keeps one step).")
    budget: str = option("params", "Structured runs: 'params' (each candidate removes the start allocation's parameters) or 'latency' "
                                   "(summed module latency at most the start allocation's).", choices=STRUCTURED_BUDGETS)
    latency_table: Optional[str] = option(None, "Structured runs: JSON file of given module times for budget='latency' "
                                                "(in Python also a dict); default: measured.")
    latency_repeats: int = option(5, "Structured runs: timed runs per latency measurement (the median is kept).")

    def check(self, config) -> None:
        super().check(config)  # choices
        if _STRUCTURED_SEARCH_CHECK is None:
            raise RuntimeError("The structured search check is not registered: import optimum_sparse.")
        _STRUCTURED_SEARCH_CHECK(self, config)


SEARCH_DEFAULTS = SearchOptions.defaults()  # {key: default}


def _validate(config, kw: dict) -> dict:
    check_search_kwargs(kw, ("uniform", "owl"), config.sparsity)
    method_cls = get_method_class(config.method)
    if not method_cls.per_linear:
        raise ValueError(f"allocation='search' builds its variants with a local method (one linear at a time, e.g. "
                         f"'magnitude', 'wanda', 'sparsegpt'); {config.method!r} prunes blocks jointly.")
    return kw


class _Search(EvolutionarySearch):
    """The unstructured search: one gene per target linear, whose target linears hold their dense weights."""

    def __init__(self, model, modules, local, config, input_ids, kw, folder, progress):
        spec, blocks, targets = check_targets(model, config)
        super().__init__(model, blocks, config, input_ids, kw, folder, progress)
        self.modules, self.local = modules, local
        self.linears = {f"{spec.blocks}.{i}.{n}": mod for i, lin in enumerate(targets) for n, mod in lin.items()}
        self.numel = [m.numel for m in modules]
        self.nm = config.nm
        if self.nm is None:
            self.total = num_pruned(sum(self.numel), config.sparsity)
            self.kmin = [math.ceil(kw["min_sparsity"] * n - 1e-9) for n in self.numel]
            self.kmax = [min(math.floor(kw["max_sparsity"] * n + 1e-9), n - 1) for n in self.numel]
        else:  # N:M: counts on the lattice numel/M · N_i, N_i in [ceil(min·M), floor(max·M)] ∩ [0, M−1]
            mm = self.nm[1]
            self.total = nm_budget(self.numel, self.nm)
            lo, hi = math.ceil(kw["min_sparsity"] * mm - 1e-9), min(math.floor(kw["max_sparsity"] * mm + 1e-9), mm - 1)
            self.kmin = [n // mm * lo for n in self.numel]
            self.kmax = [n // mm * hi for n in self.numel]
        by_size: dict[int, list] = {}
        for g, n in enumerate(self.numel):
            by_size.setdefault(n, []).append(g)
        self.classes = [g for g in by_size.values() if len(g) > 1]
        self.dense = {name: read_weight(mod, torch.device("cpu")) for name, mod in self.linears.items()}

    # ----- weights -------------------------------------------------------------------------------------------------
    def restore_dense(self) -> None:
        for name, mod in self.linears.items():
            write_weight(mod, self.dense[name], name)

    def set_gene(self, net: Supernet, gene: int, level: int) -> None:
        name = self.modules[gene].name
        write_weight(self.linears[name], net.variant(name, level, self.dense[name]), name)

    def gene_block(self, gene: int) -> int:
        return self.modules[gene].block

    def classes_for(self, net) -> list:
        return self.classes

    # ----- rounds ----------------------------------------------------------------------------------------------------
    def build_supernet(self, rnd: int, centres: list) -> Supernet:
        step = self.kw["step"] / (2 ** rnd)
        if self.nm is None:
            steps = [max(1, round(step * n)) for n in self.numel]
        else:  # N:M: the ladder is the neighbouring patterns N_i ± 1, ± 2, ... in every round
            steps = [n // self.nm[1] for n in self.numel]
        shapes = [tuple(self.dense[m.name].shape) for m in self.modules]
        net = Supernet(os.path.join(self.folder, f"round_{rnd}"), [m.name for m in self.modules], self.numel, shapes,
                       centres, steps, self.kw["levels"], self.kmin, self.kmax)
        builder = SupernetBuilder(self.config, self.local, net, self.kw["accumulation"])
        started = time.perf_counter()
        try:
            run_sequential(self.model, builder, self.config, self.input_ids, progress=self.progress)
        finally:
            self.restore_dense()
        logger.info("Supernet round %d: %d linears x %d levels, %.1f MB on disk, %.1fs.", rnd, len(self.modules),
                    2 * self.kw["levels"] + 1, net.disk_bytes() / 1e6, time.perf_counter() - started)
        return net

    def initial_centres(self) -> list:
        if self.kw["init"] == "uniform":
            return uniform_counts(self.modules, self.config.sparsity, self.nm)
        config = copy.copy(self.config)
        config.allocation_kwargs = {}
        owl = OWLAllocator(config).allocate(self.model, self.modules, self.local, self.input_ids, self.progress)
        if self.nm is not None:  # OWL's patterns, refitted inside min/max_sparsity (exact: the uniform N is inside)
            mm, n = self.nm[1], self.nm[0]
            lo = [a // (m.numel // mm) for a, m in zip(self.kmin, self.modules)]
            hi = [b // (m.numel // mm) for b, m in zip(self.kmax, self.modules)]
            steps, exact = fit_nm_steps([m.numel // mm for m in self.modules],
                                        [owl.sparsities[m.name] * mm for m in self.modules], lo, hi, self.total, n)
            if not exact:  # pragma: no cover - the uniform N is inside [min_sparsity, max_sparsity]
                raise RuntimeError("Search: OWL's N:M start missed the budget.")
            return steps_to_counts(self.numel, steps, mm)
        lo = [max(a, round(owl.numel[m.name] * owl.sparsities[m.name])) for a, m in zip(self.kmin, self.modules)]
        counts = [min(k, b) for k, b in zip(lo, self.kmax)]
        if sum(counts) != self.total:  # OWL's band may leave min/max_sparsity: refit inside them
            counts = fit_counts(self.numel, [k / n for k, n in zip(counts, self.numel)], self.total,
                                [a / n for a, n in zip(self.kmin, self.numel)],
                                [b / n for b, n in zip(self.kmax, self.numel)])
        return counts


def search_allocation(model, modules, method: PruningMethod, config, input_ids: torch.Tensor, progress: bool = True,
                      stop_after: Optional[int] = None):
    """Runs (or resumes) the search; returns the `Allocation`, or `None` when `stop_after` generations ran first.

    Args:
        model: the dense model (restored to its dense weights when this returns or raises).
        modules: `target_modules(model, config)`.
        method: the local pruning method that builds the variants.
        config: the `PruningConfig` (`allocation_kwargs` holds the search settings, see `SEARCH_DEFAULTS`).
        input_ids: calibration token ids `[n, seq_len]`; the first `search_samples` also score the candidates.
        stop_after: stop after this many generations in this call (the state on disk lets a rerun resume).
    """
    kw = _validate(config, SearchOptions.from_kwargs(config.allocation_kwargs, "allocation='search'").to_dict())
    if input_ids is None:
        raise ValueError("allocation='search' needs calibration data.")
    if any(is_offloaded(b) for b in find_blocks(model, get_architecture(model))):
        raise ValueError("allocation='search' needs the model's blocks in memory (no accelerate disk/CPU offload).")
    search, state = run_search(
        model, lambda folder: _Search(model, modules, method, config, input_ids, kw, folder, progress),
        {"method": config.method, "sparsity": config.sparsity, "true_sequential": config.true_sequential,
         "damping": config.damping, "block_size": config.block_size, "method_kwargs": config.method_kwargs,
         "modules": [(m.name, m.numel) for m in modules],
         **({"structure": config.structure} if config.nm else {})}, kw, input_ids, stop_after)
    if state is None:
        return None
    counts = state["centres"]
    if sum(counts) != search.total:  # pragma: no cover - every move is budget-neutral
        raise RuntimeError(f"Search lost the budget: {sum(counts)} pruned weights instead of {search.total}.")
    return allocation_from_counts("search", config.sparsity, modules, counts, search_info(kw, state),
                                  m=config.nm[1] if config.nm else None)


def register_structured_search_check(check) -> None:
    """Sets the check of a structured `allocation="search"` run's settings: `check(options, config)`, raising
    `ValueError` (`StructuredSearchOptions.check` calls it)."""
    global _STRUCTURED_SEARCH_CHECK
    _STRUCTURED_SEARCH_CHECK = check


@register_allocator
class SearchAllocator(Allocator):
    """Týr-style evolutionary search; `allocation_kwargs`: `SearchOptions` (structured runs: `StructuredSearchOptions`,
    run by `run_structured`, not by `allocate`)."""

    name = "search"
    needs_calibration = True
    options_class = SearchOptions

    @classmethod
    def option_classes(cls) -> tuple:
        return (SearchOptions, StructuredSearchOptions)

    @classmethod
    def options_from_config(cls, config):
        if config.is_structured:  # heads/channels: its own genes and settings (optimum_sparse.structured.search)
            return StructuredSearchOptions.from_kwargs(
                config.allocation_kwargs, f"allocation='search' with structure={config.structure!r}")
        return super().options_from_config(config)

    def allocate(self, model, modules, method, input_ids, progress=True):
        return search_allocation(model, modules, method, self.config, input_ids, progress)
