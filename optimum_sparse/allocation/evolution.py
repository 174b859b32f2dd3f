"""The evolutionary loop shared by the unstructured search (`allocation.search`) and the structured search
(`structured.search`): rounds of supernet + (1+λ) elitist generations, budget-neutral mutations, two-stage
selection, atomic state after every generation, exact resume.

A subclass says what a gene is (a linear, or the heads/channels of one block): `initial_centres`,
`build_supernet`, `set_gene`, `restore_dense`, `gene_block` and `classes_for` (or its own `mutate`, e.g. a latency
budget). The supernet it builds answers `count(gene, level)`, `valid(gene, level)`, `disk_bytes()` and has a `folder`; level `+1` is one step sparser.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from ..utils import atomic_write_text, show_progress
from .scoring import FITNESS, Scorer, num_stage_batches
from .supernet import ACCUMULATIONS

__all__ = ["EvolutionarySearch", "mutate", "check_search_kwargs", "search_fingerprint", "search_info", "state_folder",
           "run_search"]

logger = logging.getLogger(__name__)


def mutate(genome: list, rng: random.Random, net, classes: list, max_flips: int) -> list:
    """A child of `genome`: up to `max_flips` moves, each one step down (denser) on one gene and one step up on
    another gene of the same class (genes whose one-level step removes the same number of parameters), so the
    pruned-parameter count is unchanged."""
    child = list(genome)
    flips = min(rng.randint(1, max_flips), rng.randint(1, max_flips))
    for _ in range(flips):
        options = []
        for genes in classes:
            up = [g for g in genes if net.valid(g, child[g] + 1)]
            down = [g for g in genes if net.valid(g, child[g] - 1) and any(b != g for b in up)]
            if down:
                options.append((down, up))
        if not options:
            break
        down, up = options[rng.randrange(len(options))]
        a = down[rng.randrange(len(down))]
        up = [g for g in up if g != a]
        b = up[rng.randrange(len(up))]
        child[a] -= 1
        child[b] += 1
    return child


def check_search_kwargs(kw: dict, inits: tuple, sparsity: float, max_below_one: bool = True) -> None:
    """The checks common to both searches (`kw`: defaults merged with `allocation_kwargs`).

    `0 <= min_sparsity <= sparsity <= max_sparsity` must hold, with `max_sparsity < 1` for per-linear genes or
    `<= 1` (`max_below_one=False`) for structured modules, which always keep one step.
    """
    pos_int = ("levels", "rounds", "offspring", "survivors", "max_flips", "kl_topk")
    for key in pos_int:
        if isinstance(kw[key], bool) or not isinstance(kw[key], int) or kw[key] < 1:
            raise ValueError(f"PruningConfig.allocation_kwargs[{key!r}] must be a positive integer, got {kw[key]!r}.")
    if isinstance(kw["generations"], bool) or not isinstance(kw["generations"], int) or kw["generations"] < 0:
        raise ValueError(f"PruningConfig.allocation_kwargs['generations'] must be an integer >= 0, "
                         f"got {kw['generations']!r}.")
    if kw["survivors"] > kw["offspring"]:
        raise ValueError("PruningConfig.allocation_kwargs['survivors'] must not exceed 'offspring'.")
    for key, lo, hi in (("step", 0.0, 0.5), ("screen_fraction", 0.0, 1.0)):
        v = kw[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
            raise ValueError(f"PruningConfig.allocation_kwargs[{key!r}] must be a number in ({lo}, {hi}], got {v!r}.")
    if kw["init"] not in inits:
        raise ValueError(f"PruningConfig.allocation_kwargs['init'] must be one of {list(inits)}, got {kw['init']!r}.")
    if kw["fitness"] not in FITNESS:
        raise ValueError(f"PruningConfig.allocation_kwargs['fitness'] must be one of {list(FITNESS)}, "
                         f"got {kw['fitness']!r}.")
    if kw["accumulation"] not in ACCUMULATIONS:
        raise ValueError(f"PruningConfig.allocation_kwargs['accumulation'] must be one of {list(ACCUMULATIONS)}, "
                         f"got {kw['accumulation']!r}.")
    for key in ("search_samples", "search_batch_size"):
        if kw[key] is not None and (isinstance(kw[key], bool) or not isinstance(kw[key], int) or kw[key] < 1):
            raise ValueError(f"PruningConfig.allocation_kwargs[{key!r}] must be a positive integer or None, "
                             f"got {kw[key]!r}.")
    if not isinstance(kw["hidden_weight"], (int, float)) or kw["hidden_weight"] < 0:
        raise ValueError(f"PruningConfig.allocation_kwargs['hidden_weight'] must be >= 0, got {kw['hidden_weight']!r}.")
    if kw["state_dir"] is not None and not isinstance(kw["state_dir"], str):
        raise ValueError(f"PruningConfig.allocation_kwargs['state_dir'] must be a folder path, got {kw['state_dir']!r}.")
    if not isinstance(kw["keep_supernet"], bool):
        raise ValueError(f"PruningConfig.allocation_kwargs['keep_supernet'] must be True or False, "
                         f"got {kw['keep_supernet']!r}.")
    lo, hi = kw["min_sparsity"], kw["max_sparsity"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
    if not (numbers and 0 <= lo <= sparsity <= hi and (hi < 1 if max_below_one else hi <= 1)):
        raise ValueError(f"PruningConfig.allocation_kwargs min_sparsity/max_sparsity must satisfy 0 <= min_sparsity "
                         f"<= sparsity ({sparsity}) <= max_sparsity {'<' if max_below_one else '<='} 1, "
                         f"got {lo!r}, {hi!r}.")


def search_fingerprint(data: dict, kw: dict, input_ids: torch.Tensor) -> str:
    """Hash of what makes a search state reusable: `data` (config, genes), the search kwargs that shape the search
    (not `state_dir`, `keep_supernet`, `generations`: a resume may run more generations), the calibration ids."""
    data = {**data, "kwargs": {k: v for k, v in kw.items() if k not in ("state_dir", "keep_supernet", "generations")},
            "ids": hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def search_info(kw: dict, state: dict) -> dict:
    """The `Allocation.info` of a finished search: its settings, history, disk and time."""
    info = {k: v for k, v in kw.items() if k != "state_dir"}
    info.update(history=state["history"], disk_bytes=state["disk_bytes"], seconds=state["seconds"],
                final_fitness=state["history"][-1]["fitness"] if state["history"] else None)
    return info


@contextlib.contextmanager
def state_folder(state_dir: Optional[str]) -> Iterator[str]:
    """`state_dir` (created), or a temporary folder removed afterwards when it is `None`."""
    owned = state_dir is None
    folder = tempfile.mkdtemp(prefix="optimum-sparse-search-") if owned else state_dir
    os.makedirs(folder, exist_ok=True)
    try:
        yield folder
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


def run_search(model, make_search, data: dict, kw: dict, input_ids: torch.Tensor, stop_after: Optional[int] = None):
    """Runs `make_search(folder)` in eval mode inside its state folder; returns `(search, final state or None)`.

    `data` describes the config and the genes (see `search_fingerprint`).
    """
    was_training = model.training
    model.eval()
    try:
        with state_folder(kw["state_dir"]) as folder:
            search = make_search(folder)
            with search.active():
                state = search.run(search_fingerprint(data, kw, input_ids), stop_after=stop_after)
    finally:
        model.train(was_training)
    return search, state


def _rng_state(rng: random.Random) -> list:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]


def _set_rng_state(rng: random.Random, data: list) -> None:
    rng.setstate((data[0], tuple(data[1]), data[2]))


class EvolutionarySearch:
    """Rounds of (supernet, generations) over a model that holds its dense weights between calls.

    Args:
        model: the dense model; `blocks` its decoder blocks (the scorer replays them).
        config: the `PruningConfig` (`seed`, `batch_size`).
        input_ids: calibration ids; the first `kw["search_samples"]` score the candidates.
        kw: the validated search settings; folder: the state folder; progress: show progress bars.
    """

    def __init__(self, model, blocks, config, input_ids, kw: dict, folder: str, progress: bool):
        self.model, self.blocks, self.config, self.input_ids = model, blocks, config, input_ids
        self.kw, self.folder, self.progress = kw, folder, progress
        self.state_path = os.path.join(folder, "search_state.json")
        self.start: Optional[list] = None  # the round-0 centres (a subclass may bound the search around them)

    # ----- what a subclass provides ---------------------------------------------------------------------------------
    def active(self) -> contextlib.AbstractContextManager:
        """Context held around `run` (e.g. hooks the candidates need)."""
        return contextlib.nullcontext()

    def initial_centres(self) -> list:
        raise NotImplementedError

    def build_supernet(self, rnd: int, centres: list):
        raise NotImplementedError

    def set_gene(self, net, gene: int, level: int) -> None:
        raise NotImplementedError

    def restore_dense(self) -> None:
        raise NotImplementedError

    def gene_block(self, gene: int) -> int:
        raise NotImplementedError

    def classes_for(self, net) -> list:
        """Groups of genes between which a one-level move is budget-neutral."""
        raise NotImplementedError

    def mutate(self, genome: list, rng: random.Random, net) -> list:
        """A child of `genome` that keeps the budget (default: budget-neutral moves inside `classes_for(net)`)."""
        return mutate(genome, rng, net, self.classes_for(net), self.kw["max_flips"])

    # ----- state -----------------------------------------------------------------------------------------------------
    def _save(self, state: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(state))

    def _load(self, fingerprint: str) -> Optional[dict]:
        if not os.path.isfile(self.state_path):
            return None
        with open(self.state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{self.folder} holds the state of a search with other settings, model or calibration "
                             f"data; pass another allocation_kwargs['state_dir'] or empty this one.")
        return state

    # ----- rounds ----------------------------------------------------------------------------------------------------
    def run(self, fingerprint: str, stop_after: Optional[int] = None) -> Optional[dict]:
        """Runs or resumes the search; returns the final state, or `None` after `stop_after` generations."""
        kw = self.kw
        state = self._load(fingerprint)
        if state is None:
            centres = self.initial_centres()
            state = {"fingerprint": fingerprint, "round": 0, "generation": 0, "centres": centres, "start": centres,
                     "genome": [0] * len(centres), "history": [], "rng": _rng_state(random.Random(self.config.seed)),
                     "done": False, "disk_bytes": 0, "seconds": 0.0}
            self._save(state)
        self.start = state.get("start", state["centres"])
        if state["done"]:
            return state
        rng = random.Random()
        _set_rng_state(rng, state["rng"])
        batches = self.input_ids[: kw["search_samples"]].split(kw["search_batch_size"] or self.config.batch_size)
        started = time.perf_counter()
        done_now = 0
        scorer = None
        while state["round"] < kw["rounds"]:
            rnd = state["round"]
            net = self.build_supernet(rnd, state["centres"])
            state["disk_bytes"] = max(state["disk_bytes"], net.disk_bytes())
            if scorer is None:
                scorer = Scorer(self.model, self.blocks, list(batches), kw["fitness"], kw["kl_topk"], kw["hidden_weight"])
            genome = state["genome"]
            try:
                for g, level in enumerate(genome):
                    self.set_gene(net, g, level)
                every = list(range(len(batches)))
                parent_fit = scorer.score(0, every, record=True)
                bar = tqdm(total=kw["generations"], initial=state["generation"], desc=f"Search round {rnd}",
                           unit="gen", disable=not show_progress(self.progress))
                while state["generation"] < kw["generations"]:
                    if stop_after is not None and done_now >= stop_after:
                        bar.close()
                        return None
                    genome, parent_fit = self._generation(net, scorer, rng, genome, parent_fit, every, state)
                    state["genome"], state["rng"] = genome, _rng_state(rng)
                    state["generation"] += 1
                    state["seconds"] += time.perf_counter() - started
                    started = time.perf_counter()
                    self._save(state)
                    done_now += 1
                    bar.update(1)
                bar.close()
            finally:
                self.restore_dense()
            state["centres"] = [net.count(g, lv) for g, lv in enumerate(genome)]
            state.update(round=rnd + 1, generation=0, genome=[0] * len(genome))
            state["done"] = state["round"] >= kw["rounds"]
            self._save(state)
            if not kw["keep_supernet"]:
                shutil.rmtree(net.folder, ignore_errors=True)
        return state

    def _generation(self, net, scorer, rng, genome, parent_fit, every, state):
        kw = self.kw
        seen = {tuple(genome)}
        children = []
        for _ in range(20 * kw["offspring"]):
            if len(children) == kw["offspring"]:
                break
            child = self.mutate(genome, rng, net)
            if tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        screen = sorted(rng.sample(every, num_stage_batches(len(every), kw["screen_fraction"])))
        scored = []
        for child in children:
            scored.append((self._score_child(net, scorer, genome, child, screen), child))
        scored.sort(key=lambda item: item[0])
        survivors = [child for _, child in scored[: kw["survivors"]]]
        if screen != every:
            final = [(self._score_child(net, scorer, genome, child, every), child) for child in survivors]
        else:
            final = [(fit, child) for fit, child in scored[: kw["survivors"]]]
        best_fit, best = min(final, key=lambda item: item[0]) if final else (math.inf, genome)
        accepted = best_fit < parent_fit
        entry = {"round": state["round"], "generation": state["generation"], "parent_fitness": parent_fit,
                 "best_child_fitness": best_fit, "accepted": accepted, "children": len(children)}
        if accepted:
            start = self._first_block(genome, best)
            for g in self._changed(genome, best):
                self.set_gene(net, g, best[g])
            new_fit = scorer.score(start, every, record=True)
            entry["fitness"] = new_fit
            genome, parent_fit = best, new_fit
        else:
            entry["fitness"] = parent_fit
        state["history"].append(entry)
        logger.debug("Search %s", entry)
        return genome, parent_fit

    @staticmethod
    def _changed(parent, child) -> list:
        return [g for g, (a, b) in enumerate(zip(parent, child)) if a != b]

    def _first_block(self, parent, child) -> int:
        return min(self.gene_block(g) for g in self._changed(parent, child))

    def _score_child(self, net, scorer, parent, child, batches) -> float:
        changed = self._changed(parent, child)
        for g in changed:
            self.set_gene(net, g, child[g])
        try:
            return scorer.score(self._first_block(parent, child), batches)
        finally:
            for g in changed:
                self.set_gene(net, g, parent[g])
