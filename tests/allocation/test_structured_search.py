"""The structured (heads/channels) Týr-style search: exact budget, elitism, resume, masking = shrinking, records."""

from __future__ import annotations

import copy
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch
import transformers

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.allocation.evolution import mutate
from optimum_sparse.methods import get_method_class
from optimum_sparse.structured.allocation import ModuleBudget, uniform_allocation
from optimum_sparse.structured.runner import plan_structured
from optimum_sparse.structured.search import (
    StructuredSupernet, _StructuredSearch, structured_search, validate_structured_search,
)

from ..helpers import (
    assert_state_unchanged, block_path, make_ids, make_model, save_model_and_text, snapshot, weight_out_in,
)

SMALL = {"generations": 3, "rounds": 2, "offspring": 4, "survivors": 2, "levels": 2}


def _config(method="structprune", sparsity=0.3, structure="channels+heads", method_kwargs=None, **kwargs):
    return PruningConfig(method=method, sparsity=sparsity, structure=structure, num_samples=8, seq_len=16,
                         batch_size=4, method_kwargs=method_kwargs or {}, allocation="search",
                         allocation_kwargs={**SMALL, **kwargs})


def _search(model, config, stop_after=None):
    plan = plan_structured(model, config)
    method = get_method_class(config.method)(config)
    return plan, structured_search(model, plan, method, config, make_ids(), progress=False, stop_after=stop_after)


def _removed(modules, kept) -> int:
    return sum((m.groups - k) * m.cost for m, k in zip(modules, kept))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_structured_moves_keep_the_removed_parameters_exact():
    # two head modules (cost 10/group), three channel modules of one size, one of another size
    modules = [ModuleBudget((0, "heads"), 4, 10, 1, 40), ModuleBudget((1, "heads"), 4, 10, 1, 40),
               ModuleBudget((0, "channels"), 64, 3, 8, 192), ModuleBudget((1, "channels"), 64, 3, 8, 192),
               ModuleBudget((2, "channels"), 64, 3, 8, 192), ModuleBudget((3, "channels"), 32, 6, 8, 192)]
    centres = [2, 3, 32, 40, 24, 16]
    net = StructuredSupernet.__new__(StructuredSupernet)
    net.centres, net.steps, net.levels = centres, [1, 1, 8, 8, 8, 8], 2
    net.kmin, net.kmax = [m.options()[0] for m in modules], [m.groups for m in modules]
    net.options = [frozenset(m.options()) for m in modules]
    classes = _StructuredSearch.classes_for(SimpleNamespace(modules=modules), net)
    assert sorted(map(sorted, classes)) == [[0, 1], [2, 3, 4]]  # the 32-channel module moves 48 params: alone
    total = _removed(modules, centres)
    rng = random.Random(0)
    genome = [0] * len(modules)
    moved = 0
    for _ in range(300):
        genome = mutate(genome, rng, net, classes, 3)
        kept = [net.count(g, lv) for g, lv in enumerate(genome)]
        assert _removed(modules, kept) == total
        assert all(k in m.options() for k, m in zip(kept, modules))
        moved += any(genome)
    assert moved


@pytest.mark.parametrize("arch,method,fitness,init", [
    ("llama", "structprune", "kl", "uniform"),
    ("opt", "flap", "kl+hidden", "method"),
    ("llama", "wanda-structured", "hidden", "softmax"),
    ("opt", "structprune", "kl", "method"),
])
def test_search_meets_the_budget_exactly_and_is_never_worse(arch, method, fitness, init):
    model = make_model(arch, num_layers=3)
    before = snapshot(model)
    config = _config(method, 0.3, fitness=fitness, init=init)
    plan, alloc = _search(model, config)
    assert_state_unchanged(model, before)  # the search leaves the dense model as it found it
    assert _no_hooks(model)
    s = alloc.info["structured"]
    names = plan.module_names()
    kept = [s["kept_groups"][n] for n in names]
    start = [s["start_kept_groups"][n] for n in names]
    # the invariant: exactly the removed parameters of the start allocation, itself within one step of the budget
    assert _removed(plan.modules, kept) == _removed(plan.modules, start) == s["removed_params"] == alloc.pruned_params
    assert abs(s["removed_params"] - plan.budget) <= max(m.step * m.cost for m in plan.modules)
    assert all(k in m.options() for k, m in zip(kept, plan.modules))
    if init == "uniform":
        assert start == uniform_allocation(plan.modules, 0.3)
    else:  # the method's own allocation, as a run without search computes it (softmax / threshold + round_to_budget)
        rule = get_method_class(method).default_allocation if init == "method" else init
        reference = SparsePruner(PruningConfig(method=method, sparsity=0.3, structure="channels+heads", num_samples=8,
                                               seq_len=16, batch_size=4, method_kwargs={"allocation": rule}))
        reference.apply(copy.deepcopy(model), dataset=make_ids(), progress=False)
        assert reference.allocation.method == rule
        assert reference.allocation.info["structured"]["kept_groups"] == s["start_kept_groups"]
    history = alloc.info["history"]
    assert len(history) == SMALL["generations"] * SMALL["rounds"]
    for entry in history:
        assert entry["fitness"] <= entry["parent_fitness"]  # elitist: never worse than the parent
        if entry["accepted"]:
            assert entry["best_child_fitness"] < entry["parent_fitness"]
            assert entry["fitness"] == pytest.approx(entry["best_child_fitness"], rel=1e-9)
    for r in range(SMALL["rounds"]):
        fits = [e["fitness"] for e in history if e["round"] == r]
        assert fits == sorted(fits, reverse=True)
    if init == "uniform":  # (a method's allocation can already be a local optimum of these tiny searches)
        assert any(e["accepted"] for e in history)
        assert kept != start


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    _, full = _search(make_model("llama", num_layers=3), _config(state_dir=str(tmp_path / "a"), generations=4))
    state = str(tmp_path / "b")
    config = _config(state_dir=state, generations=4)
    assert _search(make_model("llama", num_layers=3), config, stop_after=3)[1] is None  # stops inside round 0
    assert _search(make_model("llama", num_layers=3), config, stop_after=2)[1] is None  # resumes, stops in round 1
    assert os.path.isfile(os.path.join(state, "search_state.json"))
    _, resumed = _search(make_model("llama", num_layers=3), config)
    assert resumed.info["structured"] == full.info["structured"]
    assert resumed.info["history"] == full.info["history"]
    _, again = _search(make_model("llama", num_layers=3), config)  # a finished state returns at once
    assert again.info["structured"]["kept_groups"] == full.info["structured"]["kept_groups"]


def test_variants_are_stored_compactly(tmp_path):
    model = make_model("llama", num_layers=2)
    config = _config("structprune", generations=1, rounds=1, state_dir=str(tmp_path), keep_supernet=True)
    _search(model, config)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "round_0" / "block_00000.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            tensor = handle.get_tensor(key)
            if key.endswith("|keep"):
                assert tensor.dtype == torch.int32
            if key.endswith("|weight"):  # compensated kept columns only, never a dense [out, in] copy
                assert tensor.shape[1] < 64 if "channels" in key else tensor.shape[1] < 32
    assert any(k.endswith("|bias") for k in keys)  # StructPrune's bias correction


@pytest.mark.parametrize("arch,method", [("llama", "structprune"), ("opt", "flap")])
def test_masked_candidate_equals_the_shrunk_model(arch, method, tmp_path):
    """With centre accumulation, the level-0 candidate (masked output projections + bias hooks) computes what the
    normal structured pass computes with the same kept counts (compensation, shrinking)."""
    model = make_model(arch, num_layers=3)
    dense = copy.deepcopy(model)
    config = _config(method, accumulation="centre")
    plan = plan_structured(model, config)
    search = _StructuredSearch(model, plan, get_method_class(method)(config), config, make_ids(),
                               validate_structured_search(config), str(tmp_path), False)
    search.start = uniform_allocation(plan.modules, 0.3)
    ids = make_ids(2, 16, seed=5)
    with search.bias_hooks():
        net = search.build_supernet(0, search.start)
        for g in range(len(plan.modules)):
            search.set_gene(net, g, 0)
        masked = _logits(model, ids)
        search.restore_dense()
    reference = SparsePruner(PruningConfig(method=method, sparsity=0.3, structure="channels+heads", num_samples=8,
                                           seq_len=16, batch_size=4, method_kwargs={"allocation": "uniform"}))
    reference.apply(dense, dataset=make_ids(), progress=False)
    torch.testing.assert_close(masked, _logits(dense, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_searched_model_has_consistent_shapes_and_reloads(arch, tmp_path):
    model = make_model(arch, num_layers=3)
    biasless = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is None}
    pruner = SparsePruner(_config("structprune"))
    pruner.apply(model, dataset=make_ids(), progress=False)
    alloc, summary = pruner.allocation, pruner.structured_summary
    assert alloc.method == "search" and summary["allocation"] == "search"
    kept = alloc.info["structured"]["kept_groups"]
    prefix = block_path(model)
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    q_per_kv = heads // (getattr(model.config, "num_key_value_heads", None) or heads)
    for i, (layer, block) in enumerate(zip(summary["layers"], model.get_submodule(prefix))):
        assert layer["num_key_value_heads"] == kept[f"{prefix}.{i}.heads"]
        assert layer["intermediate_size"] == kept[f"{prefix}.{i}.channels"]
        k_proj = block.get_submodule("self_attn.k_proj")
        assert weight_out_in(k_proj).shape[0] == layer["num_key_value_heads"] * head_dim
        o_name = "self_attn.o_proj" if arch == "llama" else "self_attn.out_proj"
        assert weight_out_in(block.get_submodule(o_name)).shape[1] == layer["num_key_value_heads"] * q_per_kv * head_dim
    # the final pass removes what the search chose (StructPrune's bias correction adds a bias where there was none)
    added = sum(m.bias.numel() for n, m in model.named_modules() if n in biasless and getattr(m, "bias", None) is not None)
    removed = summary["prunable_params_before"] - summary["prunable_params_after"]
    assert removed + added == alloc.info["structured"]["removed_params"]
    assert (added > 0) == (arch == "llama")
    assert summary["model_params_before"] - summary["model_params_after"] == removed
    ids = make_ids(2, 16, seed=7)
    expected = _logits(model, ids)
    pruner.save_pretrained(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=1e-5)
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    assert report["allocation"]["method"] == "search" and report["allocation"]["info"]["history"]
    card = (tmp_path / "README.md").read_text()
    assert "## Layer-wise allocation" in card and "prunable parameters removed" in card


def test_method_allocation_is_recorded_too():
    pruner = SparsePruner(PruningConfig(method="structprune", sparsity=0.3, structure="channels+heads", num_samples=8,
                                        seq_len=16, batch_size=4))
    pruner.apply(make_model("llama"), dataset=make_ids(), progress=False)
    assert pruner.allocation.method == "softmax" and pruner.structured_summary["allocation"] == "softmax"
    plain = SparsePruner(PruningConfig(method="wanda-structured", sparsity=0.3, structure="channels", num_samples=8,
                                       seq_len=16, batch_size=4))
    plain.apply(make_model("llama"), dataset=make_ids(), progress=False)
    assert plain.allocation is None and plain.structured_summary["allocation"] == "uniform"


@pytest.mark.parametrize("kwargs,match", [
    ({"method_kwargs": {"allocation": "search"}, "allocation": "uniform"}, r"allocation='search', allocation_kwargs"),
    ({"allocation_kwargs": {"bogus": 1}}, "unknown keys"),
    ({"allocation_kwargs": {"init": "owl"}}, "init"),
    ({"allocation_kwargs": {"max_sparsity": 0.2}}, "max_sparsity"),
    ({"allocation_kwargs": {"step": 0.9}}, "step"),
    ({"allocation_kwargs": {"survivors": 8, "offspring": 4}}, "survivors"),
    ({"allocation": "owl"}, "structured methods allocate"),
    ({"layer_sparsity": {"model.layers.0.mlp.down_proj": 0.3}}, "structured methods allocate"),
])
def test_bad_settings_fail_at_config_time(kwargs, match):
    base = dict(method="structprune", sparsity=0.3, structure="channels+heads", allocation="search")
    with pytest.raises(ValueError, match=match):
        PruningConfig(**{**base, **kwargs})


def test_state_of_other_settings_is_refused_before_any_change(tmp_path):
    model = make_model("llama")
    SparsePruner(_config(generations=1, rounds=1, state_dir=str(tmp_path))).apply(model, dataset=make_ids(),
                                                                                  progress=False)
    fresh = make_model("llama")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="other settings"):
        SparsePruner(_config(generations=1, rounds=1, step=0.2, state_dir=str(tmp_path))).apply(
            fresh, dataset=make_ids(), progress=False)
    assert_state_unchanged(fresh, before)
    assert _no_hooks(fresh)


def test_cli_structured_search(tmp_path, tokenizer, capsys):
    from optimum_sparse.cli.main import main

    dense, text = save_model_and_text(tmp_path, tokenizer)
    code = main(["prune", "--model", str(dense), "--method", "wanda-structured", "--structure",
                 "channels+heads", "--sparsity", "0.3", "--num-samples", "4", "--seq-len", "16", "--dataset", str(text),
                 "--allocation", "search", "--allocation-kwargs", json.dumps({**SMALL, "rounds": 1}),
                 "--output", str(tmp_path / "out")])
    assert code == 0
    assert "of the prunable parameters" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert saved["allocation"] == "search"
    assert "--allocation search" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("arch,method,structure", [("gpt2", "magnitude-structured", "channels+heads"),
                                                   ("qwen2", "wanda-structured", "heads"),
                                                   ("llama", "flap", "channels")])
def test_other_architectures_structures_and_data_free_methods(arch, method, structure, tmp_path):
    model = make_model(arch, num_layers=3)
    pruner = SparsePruner(_config(method, 0.4 if structure == "heads" else 0.3, structure))
    pruner.apply(model, dataset=make_ids(), progress=False)  # the search scores on calibration data even data-free
    s = pruner.allocation.info["structured"]
    assert set(k.rsplit(".", 1)[1] for k in s["kept_groups"]) == set(structure.split("+"))
    assert s["removed_params"] == s["start_removed_params"]
    ids = make_ids(2, 16, seed=3)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, trust_remote_code=pruner.structured_summary["format"] != "stock").eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=1e-5)
