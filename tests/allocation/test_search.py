"""The Týr-style search: exact budget, elitism, resume, cheap storage, error accumulation."""

from __future__ import annotations

import os
import random

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.allocation import search_allocation, target_modules
from optimum_sparse.allocation.search import mutate
from optimum_sparse.allocation.supernet import Supernet, SupernetBuilder, pack_mask, unpack_mask
from optimum_sparse.engine.sequential import run_sequential
from optimum_sparse.methods import get_method_class
from optimum_sparse.methods.masks import num_pruned

from ..helpers import block_linears, make_ids, make_model, snapshot, weight_out_in

SMALL = {"generations": 3, "rounds": 2, "offspring": 4, "survivors": 2, "levels": 2, "step": 0.1}


def _config(method="wanda", sparsity=0.6, **kwargs):
    return PruningConfig(method=method, sparsity=sparsity, num_samples=8, seq_len=16, batch_size=4,
                         allocation="search", allocation_kwargs={**SMALL, **kwargs})


def _search(model, config, stop_after=None):
    method = get_method_class(config.method)(config)
    return search_allocation(model, target_modules(model, config), method, config, make_ids(), progress=False,
                             stop_after=stop_after)


def test_pack_roundtrip():
    mask = torch.rand(7, 13) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_mask(packed, (7, 13)), mask)


def test_mutation_keeps_the_budget_exact():
    numel = [100, 100, 100, 60, 60]
    net = Supernet.__new__(Supernet)
    net.centres, net.steps, net.levels = [50, 50, 50, 30, 30], [10, 10, 10, 6, 6], 2
    net.kmin, net.kmax = [0] * 5, [n - 1 for n in numel]
    rng = random.Random(0)
    genome = [0] * 5
    total = sum(net.count(g, 0) for g in range(5))
    changed = 0
    for _ in range(300):
        genome = mutate(genome, rng, net, [[0, 1, 2], [3, 4]], 3)
        assert sum(net.count(g, lv) for g, lv in enumerate(genome)) == total
        assert all(net.valid(g, lv) for g, lv in enumerate(genome))
        changed += any(genome)
    assert changed  # it does move
    net.levels = 1  # gene 0 can only go down, gene 1 only up, gene 2 both: never an impossible pair
    for _ in range(100):
        child = mutate([1, -1, 0, 0, 0], rng, net, [[0, 1, 2]], 3)
        assert sum(net.count(g, lv) for g, lv in enumerate(child)) == total
        assert all(net.valid(g, lv) for g, lv in enumerate(child))


@pytest.mark.parametrize("arch,method,fitness", [("llama", "wanda", "kl"), ("opt", "sparsegpt", "kl+hidden"),
                                                 ("gpt2", "magnitude", "hidden"), ("gemma2", "wanda", "kl")])
def test_search_exact_budget_and_never_worse(arch, method, fitness):
    model = make_model(arch, num_layers=3)
    before = snapshot(model)
    config = _config(method, 0.6, fitness=fitness)
    alloc = _search(model, config)
    after = model.state_dict()  # the search leaves the dense model as it found it
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert alloc.method == "search" and alloc.pruned_params == alloc.target_params
    history = alloc.info["history"]
    assert len(history) == SMALL["generations"] * SMALL["rounds"]
    for entry in history:
        assert entry["fitness"] <= entry["parent_fitness"]  # elitist: never worse than the parent
        if entry["accepted"]:
            assert entry["fitness"] == pytest.approx(entry["best_child_fitness"], rel=1e-9)
            assert entry["best_child_fitness"] < entry["parent_fitness"]
    for r in range(SMALL["rounds"]):  # within a round, the parent's fitness never rises
        fits = [e["fitness"] for e in history if e["round"] == r]
        assert fits == sorted(fits, reverse=True)
    assert any(e["accepted"] for e in history)
    assert len(set(round(s, 6) for s in alloc.sparsities.values())) > 1  # a non-uniform distribution


@pytest.mark.parametrize("init", ["uniform", "owl"])
def test_search_through_the_pruner_prunes_exactly_the_budget(init):
    model = make_model("llama", num_layers=3)
    pruner = SparsePruner(_config("wanda", 0.7, init=init))
    pruner.apply(model, dataset=make_ids(), progress=False)
    alloc = pruner.allocation
    zeros = {n: int((weight_out_in(m) == 0).sum()) for n, m in block_linears(model).items()}
    assert sum(zeros.values()) == alloc.target_params
    for name, s in alloc.sparsities.items():
        assert zeros[name] == num_pruned(alloc.numel[name], s)
    assert pruner.record.allocation["info"]["history"]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full = _search(make_model("llama", num_layers=3), _config(state_dir=str(tmp_path / "a"), generations=4))
    state = str(tmp_path / "b")
    config = _config(state_dir=state, generations=4)
    assert _search(make_model("llama", num_layers=3), config, stop_after=3) is None  # stops inside round 0
    assert _search(make_model("llama", num_layers=3), config, stop_after=2) is None  # resumes, stops in round 1
    assert os.path.isfile(os.path.join(state, "search_state.json"))
    resumed = _search(make_model("llama", num_layers=3), config)
    assert resumed.sparsities == full.sparsities
    assert resumed.info["history"] == full.info["history"]
    again = _search(make_model("llama", num_layers=3), config)  # a finished state returns at once
    assert again.sparsities == full.sparsities


def test_state_of_other_settings_is_refused(tmp_path):
    _search(make_model("llama"), _config(state_dir=str(tmp_path), generations=1, rounds=1))
    with pytest.raises(ValueError, match="other settings"):
        _search(make_model("llama"), _config(state_dir=str(tmp_path), generations=1, rounds=1, step=0.2))


def _build(model, config, folder, accumulation):
    modules = target_modules(model, config)
    dense = {n: weight_out_in(m).float().clone() for n, m in block_linears(model).items()}
    numel = [m.numel for m in modules]
    centres = [num_pruned(n, config.sparsity) for n in numel]
    net = Supernet(folder, [m.name for m in modules], numel, [tuple(dense[m.name].shape) for m in modules], centres,
                   [max(1, round(0.1 * n)) for n in numel], 2, [0] * len(numel), [n - 1 for n in numel])
    local = get_method_class(config.method)(config)
    run_sequential(model, SupernetBuilder(config, local, net, accumulation), config, make_ids(), progress=False)
    return net, modules, dense


def test_supernet_storage_and_expectation_error_accumulation(tmp_path):
    config = _config("wanda", 0.6)
    nets = {}
    for acc in ("none", "expectation"):
        model = make_model("llama", num_layers=2)
        nets[acc] = _build(model, config, str(tmp_path / acc), acc)
    net, modules, dense = nets["expectation"]
    net_none = nets["none"][0]
    # block 0 sees the same (dense) inputs either way; block 1 sees the expected pruned output of block 0
    for m in modules:
        same = torch.equal(net.variant(m.name, 1, dense[m.name]), net_none.variant(m.name, 1, dense[m.name]))
        assert same == (m.block == 0), m.name
    # a variant is its mask (Wanda keeps the other weights): about numel/8 bytes, far below a dense copy
    dense_bytes = sum(4 * m.numel for m in modules) * 5
    assert net.disk_bytes() < dense_bytes / 16  # bits are 1/32 of float32; the rest is file headers
    for m in modules:
        for level in net.gene_levels(net.index[m.name]):
            w = net.variant(m.name, level, dense[m.name])
            assert int((w == 0).sum()) == net.count(net.index[m.name], level)


def test_sparsegpt_variants_store_their_updated_weights(tmp_path):
    config = _config("sparsegpt", 0.5)
    model = make_model("llama", num_layers=1)
    net, modules, dense = _build(model, config, str(tmp_path), "centre")
    m = modules[0]
    w = net.variant(m.name, 0, dense[m.name])
    kept = w != 0
    assert not torch.equal(w[kept], dense[m.name][kept])  # the OBS update is kept, not rebuilt from the dense weight
    assert net.disk_bytes() < sum(4 * m.numel for m in modules) * 5  # kept values only, not dense copies


@pytest.mark.parametrize("kwargs,match", [
    ({"fitness": "ppl"}, "fitness"), ({"survivors": 10}, "must not exceed"), ({"step": 0.0}, "step"),
    ({"max_sparsity": 0.5}, "max_sparsity"), ({"accumulation": "median"}, "accumulation"),
    ({"levels": 0}, "levels"), ({"colour": 1}, "unknown keys"), ({"init": "random"}, "init"),
])
def test_search_kwargs_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_search_needs_a_local_method():
    with pytest.raises(ValueError, match="local method"):
        _config("sparsellm")
    with pytest.raises(ValueError, match="cannot be combined"):
        PruningConfig(allocation="search", layer_sparsity={"a": 0.5})
