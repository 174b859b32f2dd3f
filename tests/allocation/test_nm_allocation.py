"""Layer-wise N:M allocation: per-layer patterns N_i:M with the uniform N:M budget (OWL, search, overrides)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.allocation import allocate, fit_nm_steps, nm_budget, search_allocation, target_modules
from optimum_sparse.methods import get_method_class
from optimum_sparse.methods.masks import layer_nm, nm_step

from ..helpers import assert_state_unchanged, block_linears, make_ids, make_model, snapshot, weight_out_in

SMALL = {"generations": 3, "rounds": 2, "offspring": 4, "survivors": 2, "levels": 1}


def _config(structure="2:4", method="wanda", **kwargs):
    return PruningConfig(method=method, structure=structure, num_samples=8, seq_len=16, batch_size=4, **kwargs)


def _outlier_model(num_layers=3):
    """Block 1 gets a tenth of large weights: OWL prunes it less."""
    model = make_model("llama", num_layers=num_layers)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in (model.model.layers[1].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
            lin.weight[torch.rand(lin.weight.shape, generator=generator) < 0.1] *= 10.0
    return model


def _groups_ok(model, alloc):
    """Every pruned linear has exactly N_i zeros in every group of M consecutive inputs (its pattern)."""
    m = alloc.m
    for name, module in block_linears(model).items():
        n = nm_step(alloc.sparsities[name], m)
        w = weight_out_in(module)
        zeros = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((zeros == n).all()), (name, n, zeros.unique())


def _budget(alloc):
    return nm_budget(list(alloc.numel.values()), (round(alloc.target * alloc.m), alloc.m))


# ----- the exact lattice fit -------------------------------------------------------------------------------------
def test_fit_nm_steps_exact_or_nearest_not_above():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 5)
        groups = [rng.choice([3, 6, 8, 12, 16]) for _ in range(n)]
        m = rng.choice([4, 8])
        lo = [rng.randint(0, m - 1) for _ in range(n)]
        hi = [rng.randint(a, m - 1) for a in lo]
        total = rng.randint(sum(g * a for g, a in zip(groups, lo)), sum(g * b for g, b in zip(groups, hi)) + 5)
        desired = [rng.uniform(0, m - 1) for _ in range(n)]
        sums = (sum(g * x for g, x in zip(groups, c)) for c in itertools.product(*map(range, lo, [b + 1 for b in hi])))
        best = max(s for s in sums if s <= total)  # brute force: the nearest achievable count not above the budget
        steps, exact = fit_nm_steps(groups, desired, lo, hi, total)
        pruned = sum(g * x for g, x in zip(groups, steps))
        assert all(a <= x <= b for x, a, b in zip(steps, lo, hi))
        assert pruned == best and exact == (pruned == total)
        steps, exact = fit_nm_steps(groups, desired, lo, hi, total, max_bits=1)  # the greedy fallback: not above
        assert sum(g * x for g, x in zip(groups, steps)) <= total
    with pytest.raises(ValueError, match="already prune"):
        fit_nm_steps([4, 4], [1, 1], [2, 2], [3, 3], 10)


def test_fit_nm_steps_follows_the_desired_shape():
    steps, exact = fit_nm_steps([8, 8, 8, 4], [1.2, 2.9, 2.0, 2.0], [1, 1, 1, 1], [3, 3, 3, 3], 56)
    assert exact and steps == [1, 3, 2, 2]


def test_layer_nm():
    assert layer_nm(None, 0.37) is None
    assert layer_nm((2, 4), 0.5) == (2, 4) and layer_nm((2, 4), 0.75) == (3, 4) and layer_nm((2, 4), 0.0) == (0, 4)
    assert layer_nm((4, 8), 3 / 8) == (3, 8)
    with pytest.raises(ValueError, match="multiple of 1/4"):
        layer_nm((2, 4), 0.6)


# ----- OWL ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_owl_nm_exact_budget_on_the_lattice_inside_the_band(structure):
    model = _outlier_model()
    config = _config(structure, allocation="owl")
    alloc = allocate(model, config, get_method_class("wanda")(config), make_ids(), progress=False)
    n, m = config.nm
    assert alloc.m == m and alloc.pruned_params == alloc.target_params == _budget(alloc)
    steps = {name: nm_step(s, m) for name, s in alloc.sparsities.items()}  # raises off the lattice
    assert set(steps.values()) <= {n - 1, n, n + 1}  # default lambda = 1/M: one step each side
    assert alloc.info["lambda"] == pytest.approx(1 / m) and alloc.info["band"] == [f"{n - 1}:{m}", f"{n + 1}:{m}"]
    assert len(set(steps.values())) > 1
    blocks = alloc.per_block()
    assert blocks["model.layers.1"] < blocks["model.layers.0"] and blocks["model.layers.1"] < blocks["model.layers.2"]
    # a narrower band: lambda below one step leaves only N
    config = _config(structure, allocation="owl", allocation_kwargs={"lambda": 0.5 / m})
    alloc = allocate(model, config, get_method_class("wanda")(config), make_ids(), progress=False)
    assert set(alloc.sparsities.values()) == {n / m}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "alps"])
def test_owl_nm_prunes_every_layer_with_its_pattern(method):
    model = _outlier_model()
    kwargs = {"method_kwargs": {"max_iterations": 20}} if method == "alps" else {}
    pruner = SparsePruner(_config("2:4", method, allocation="owl", **kwargs))
    pruner.apply(model, dataset=make_ids(), progress=False)
    alloc = pruner.allocation
    _groups_ok(model, alloc)
    zeros = sum(int((weight_out_in(mod) == 0).sum()) for mod in block_linears(model).values())
    assert zeros == alloc.target_params == _budget(alloc)
    record = pruner.record.allocation
    assert record["m"] == 4 and set(record["patterns"].values()) == {"1:4", "2:4", "3:4"}
    assert "3:4" in alloc.table() and "| Patterns |" in alloc.table()


def test_card_shows_the_patterns():
    from optimum_sparse.hub.card import build_model_card

    model = _outlier_model()
    pruner = SparsePruner(_config("2:4", "wanda", allocation="owl"))
    pruner.apply(model, dataset=make_ids(), progress=False)
    text = str(build_model_card(pruner.record))
    assert "per-layer N:4 patterns" in text and "exactly the target" in text
    layer = next(n for n, p in pruner.allocation.patterns().items() if p == "3:4")
    assert f"| `{layer}` |" in text and "(3:4)" in text


# ----- overrides ---------------------------------------------------------------------------------------------------
def test_override_nm_complete_partial_and_errors():
    model = make_model("llama")
    names = list(block_linears(model))
    # complete: q/o at 3:4 and k/v at 1:4 in block 0, the reverse in block 1, the MLP mixed -> exactly the budget
    ratios = {}
    for name in names:
        block = int(name.split(".")[2])
        if name.endswith(("q_proj", "o_proj")):
            ratios[name] = 0.75 if block == 0 else 0.25
        elif name.endswith(("k_proj", "v_proj")):
            ratios[name] = 0.25 if block == 0 else 0.75
        else:
            ratios[name] = 0.5
    ratios["model.layers.0.mlp.up_proj"], ratios["model.layers.1.mlp.up_proj"] = 0.0, 0.75  # a dense 0:4 layer
    ratios["model.layers.0.mlp.down_proj"] = 0.75  # up/down have the same size: 0 + 3 + 3 + 2 = 4 x 2
    pruner = SparsePruner(_config("2:4", "sparsegpt", layer_sparsity=ratios))
    pruner.apply(model, dataset=make_ids(), progress=False)
    alloc = pruner.allocation
    assert alloc.method == "override" and alloc.sparsities == ratios and alloc.pruned_params == _budget(alloc)
    _groups_ok(model, alloc)
    assert bool((weight_out_in(block_linears(model)["model.layers.0.mlp.up_proj"]) != 0).all())  # 0:4 stays dense

    # partial: the others absorb the difference exactly
    model = make_model("llama")
    pinned = {"model.layers.0.mlp.down_proj": 0.75, "model.layers.1.self_attn.k_proj": 0.0}
    pruner = SparsePruner(_config("4:8", "wanda", layer_sparsity={k: v for k, v in pinned.items()}))
    pruner.apply(model, dataset=make_ids(), progress=False)
    alloc = pruner.allocation
    assert alloc.pruned_params == alloc.target_params == _budget(alloc)
    assert all(alloc.sparsities[k] == v for k, v in pinned.items())
    _groups_ok(model, alloc)


def test_override_nm_nearest_count_not_above_when_exact_is_impossible():
    # groups of M=4 per block: q/o 256, k/v 128, gate/up/down 512; budget 2 x 2304 x 2 = 9216 pruned weights. Pin all
    # but block 0's down_proj so that 256 weights remain: it can only prune 0 or 512 -> nearest not above: 0 (dense).
    model = make_model("llama")
    ratios = {n: 0.5 for n in block_linears(model) if n != "model.layers.0.mlp.down_proj"}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        ratios[f"model.layers.1.self_attn.{name}"] = 0.75
    pruner = SparsePruner(_config("2:4", "magnitude", layer_sparsity=ratios))
    pruner.apply(model, progress=False)
    alloc = pruner.allocation
    assert alloc.sparsities["model.layers.0.mlp.down_proj"] == 0.0
    assert alloc.target_params - alloc.pruned_params == alloc.info["budget_gap"] == 256
    _groups_ok(model, alloc)


def test_override_nm_errors_before_any_weight_changes():
    with pytest.raises(ValueError, match=r"multiple of 1/4 .*'model.layers.0.mlp.down_proj': 0.3"):
        _config("2:4", layer_sparsity={"model.layers.0.mlp.down_proj": 0.3})
    with pytest.raises(ValueError, match=r"multiple of 1/8"):
        _config("4:8", layer_sparsity={"model.layers.0.mlp.down_proj": 0.25 + 0.0625})
    model = make_model("llama")
    before = snapshot(model)
    ratios = {n: 0.75 for n in block_linears(model)}  # complete, above the 2:4 budget
    with pytest.raises(ValueError, match="complete N:M override must meet it exactly"):
        SparsePruner(_config("2:4", "magnitude", layer_sparsity=ratios)).apply(model, progress=False)
    assert_state_unchanged(model, before)
    ratios = {n: 0.75 for n in list(block_linears(model))[:-1]}  # partial: the last layer cannot make it up
    with pytest.raises(ValueError, match="no way to meet the N:4 budget"):
        SparsePruner(_config("2:4", "magnitude", layer_sparsity=ratios)).apply(model, progress=False)
    assert_state_unchanged(model, before)
    bad = lambda name: 0.6  # noqa: E731
    with pytest.raises(ValueError, match=r"sparsity_for\('model.layers.0.self_attn.q_proj'\).*multiple of 1/4"):
        SparsePruner(_config("2:4", "magnitude")).apply(model, sparsity_for=bad, progress=False)
    assert_state_unchanged(model, before)


def test_uniform_nm_unchanged():
    model, reference = make_model("llama"), make_model("llama")
    SparsePruner(_config("2:4", "sparsegpt")).apply(model, dataset=make_ids(), progress=False)
    pruner = SparsePruner(_config("2:4", "sparsegpt"))
    pruner.apply(reference, dataset=make_ids(), progress=False, sparsity_for=lambda name: 0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# ----- search ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure,init", [("2:4", "uniform"), ("4:8", "owl")])
def test_search_nm_exact_budget_never_worse_and_patterns(structure, init):
    model = make_model("llama", num_layers=3)
    before = snapshot(model)
    config = _config(structure, "wanda", allocation="search", allocation_kwargs={**SMALL, "init": init})
    method = get_method_class("wanda")(config)
    alloc = search_allocation(model, target_modules(model, config), method, config, make_ids(), progress=False)
    assert_state_unchanged(model, before)
    n, m = config.nm
    assert alloc.m == m and alloc.pruned_params == alloc.target_params == _budget(alloc)
    steps = {name: nm_step(s, m) for name, s in alloc.sparsities.items()}
    for entry in alloc.info["history"]:
        assert entry["fitness"] <= entry["parent_fitness"]
    if any(e["accepted"] for e in alloc.info["history"]):
        assert len(set(steps.values())) > 1
    # moves only trade one N step between linears of equal size: every size class keeps the uniform mean
    by_size: dict = {}
    for name, step in steps.items():
        by_size.setdefault(alloc.numel[name], []).append(step)
    if init == "uniform":
        assert all(sum(v) == n * len(v) for v in by_size.values())


def test_search_nm_through_the_pruner():
    model = make_model("llama", num_layers=3)
    pruner = SparsePruner(_config("2:4", "sparsegpt", allocation="search", allocation_kwargs=SMALL))
    pruner.apply(model, dataset=make_ids(), progress=False)
    _groups_ok(model, pruner.allocation)
    assert pruner.allocation.pruned_params == _budget(pruner.allocation)


def test_search_nm_refuses_joint_methods():
    with pytest.raises(ValueError, match="local method"):
        _config("2:4", "sparsellm", allocation="search")


# ----- joint and whole-model methods take per-layer patterns too ------------------------------------------------------
def test_sparsellm_nm_override():
    model = make_model("llama")
    pinned = {"model.layers.0.mlp.down_proj": 0.75, "model.layers.1.mlp.up_proj": 0.25,
              "model.layers.0.self_attn.q_proj": 0.0}
    pruner = SparsePruner(_config("2:4", "sparsellm", layer_sparsity=pinned, method_kwargs={"iterations": 2}))
    pruner.apply(model, dataset=make_ids(), progress=False)
    assert all(pruner.allocation.sparsities[k] == v for k, v in pinned.items())
    assert pruner.allocation.pruned_params == _budget(pruner.allocation)
    _groups_ok(model, pruner.allocation)


def test_elsa_nm_override_gpt2_conv1d():
    from ..methods.test_elsa import elsa_config, learnable_ids

    model, ids = make_model("gpt2"), learnable_ids()
    pinned = {"transformer.h.0.mlp.c_fc": 0.25, "transformer.h.1.mlp.c_fc": 0.75}
    config = elsa_config(ids, 0.5, "2:4")
    config.layer_sparsity = pinned
    pruner = SparsePruner(config)
    pruner.apply(model, dataset=ids, progress=False)
    assert all(pruner.allocation.sparsities[k] == v for k, v in pinned.items())
    _groups_ok(model, pruner.allocation)
