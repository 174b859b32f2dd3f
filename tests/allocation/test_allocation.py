"""Allocation plumbing: exact budgets, uniform, OWL, the per-layer override, config/CLI/report integration."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.allocation import (OWLAllocator, UniformAllocator, allocate, apply_override, fit_counts,
                                       target_modules)
from optimum_sparse.allocation.owl import outlier_ratio, owl_block_sparsity
from optimum_sparse.methods import get_method_class
from optimum_sparse.methods.masks import num_pruned

from ..helpers import assert_state_unchanged, block_linears, make_ids, make_model, snapshot, weight_out_in


def _config(**kwargs):
    kwargs.setdefault("method", "wanda")
    if kwargs.get("structure", "unstructured") == "unstructured":  # N:M prunes N/M; another sparsity is refused
        kwargs.setdefault("sparsity", 0.6)
    return PruningConfig(num_samples=8, seq_len=16, batch_size=4, **kwargs)


def _prune(model, **kwargs):
    pruner = SparsePruner(_config(**kwargs))
    pruner.apply(model, dataset=make_ids(), progress=False)
    return pruner


def _zeros(model, names):
    linears = block_linears(model)
    return {n: int((weight_out_in(linears[n]) == 0).sum()) for n in names}


def _allocate(model, **kwargs):
    config = _config(**kwargs)
    method = get_method_class(config.method)(config)
    return allocate(model, config, method, make_ids(), progress=False), target_modules(model, config)


# ----- the exact-budget core -------------------------------------------------------------------------------------
def test_fit_counts_is_exact_and_inside_bounds():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        numel = [rng.randint(5, 500) for _ in range(n)]
        ratios = [rng.random() * 0.9 for _ in range(n)]
        target = rng.uniform(0.1, 0.8)
        lo, hi = max(0.0, target - 0.15), min(0.99, target + 0.15)
        total = num_pruned(sum(numel), target)
        try:
            counts = fit_counts(numel, ratios, total, lo, hi)
        except ValueError:  # only when the bounds cannot hold the total
            assert total < sum(-(-lo * m // 1) for m in numel) or total > sum(int(hi * m) for m in numel)
            continue
        assert sum(counts) == total
        assert all(lo - 1e-12 <= k / m <= hi + 1e-12 for k, m in zip(counts, numel))


def test_fit_counts_keeps_the_shape_of_the_ratios():
    counts = fit_counts([1000, 1000, 1000], [0.4, 0.5, 0.6], 1500)
    assert counts == [400, 500, 600]
    counts = fit_counts([1000, 1000, 1000], [0.5, 0.6, 0.7], 1500)  # shifted down by 0.1 as a whole
    assert counts == [400, 500, 600]


def test_fit_counts_infeasible():
    with pytest.raises(ValueError, match="Cannot prune exactly"):
        fit_counts([100, 100], [0.5, 0.5], 150, low=0.0, high=0.6)


# ----- uniform ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "falcon"])
def test_uniform_allocator_exact(arch):
    model = make_model(arch, num_layers=3)
    config = _config(sparsity=0.37)
    modules = target_modules(model, config)
    alloc = UniformAllocator(config).allocate(model, modules, None, None)
    assert alloc.pruned_params == num_pruned(sum(m.numel for m in modules), 0.37) == alloc.target_params
    for m in modules:  # at most one weight away from floor(numel·s)
        assert 0 <= num_pruned(m.numel, alloc.sparsities[m.name]) - num_pruned(m.numel, 0.37) <= 1


def test_plain_uniform_keeps_the_engine_default():
    model = make_model("llama")
    pruner = _prune(model)
    assert pruner.allocation is None and "allocation" not in pruner.report.to_dict()


# ----- OWL -------------------------------------------------------------------------------------------------------
def test_outlier_ratio_and_block_formula():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0])]
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)  # mean 10.9: only 100 is above 5x the mean
    assert owl_block_sparsity([0.1, 0.1, 0.1], 0.7, 0.08) == [0.7, 0.7, 0.7]  # constant LOD: no division by zero
    s = owl_block_sparsity([0.0, 0.5, 1.0], 0.7, 0.08)
    assert s == pytest.approx([0.78, 0.70, 0.62])  # more outliers -> less sparsity, band 2λ around s


@pytest.mark.parametrize("arch,method", [("llama", "wanda"), ("opt", "sparsegpt"), ("gpt2", "magnitude"),
                                         ("gemma2", "wanda")])
def test_owl_exact_and_inside_band(arch, method):
    model = make_model(arch, num_layers=4)
    lam = 0.08
    pruner = _prune(model, method=method, sparsity=0.7, allocation="owl", allocation_kwargs={"M": 3, "lambda": lam})
    alloc = pruner.allocation
    assert alloc.method == "owl"
    assert alloc.pruned_params == alloc.target_params
    assert all(0.7 - lam - 1e-9 <= s <= 0.7 + lam + 1e-9 for s in alloc.sparsities.values())
    per_block = list(alloc.per_block().values())
    assert max(per_block) - min(per_block) > lam  # a real redistribution, not uniform
    zeros = _zeros(model, alloc.sparsities)
    assert sum(zeros.values()) == alloc.target_params  # the pruned model holds exactly the budget
    for name, s in alloc.sparsities.items():
        assert zeros[name] == num_pruned(alloc.numel[name], s)
    assert pruner.report.to_dict()["allocation"]["method"] == "owl"


def test_owl_lower_outlier_blocks_get_more_sparsity():
    model = make_model("llama", num_layers=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a tenth of block 1's weights become large: many scores above M times the mean
        for lin in (model.model.layers[1].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
            lin.weight[torch.rand(lin.weight.shape, generator=generator) < 0.1] *= 10.0
    alloc, _ = _allocate(model, sparsity=0.6, allocation="owl")
    blocks = alloc.per_block()
    assert blocks["model.layers.1"] < blocks["model.layers.0"] and blocks["model.layers.1"] < blocks["model.layers.2"]
    assert alloc.info["outlier_ratio"]["1"] > alloc.info["outlier_ratio"]["0"]


def test_owl_kwargs_validated():
    with pytest.raises(ValueError, match=r"allocation_kwargs\['M'\]"):
        _config(allocation="owl", allocation_kwargs={"M": -1})
    with pytest.raises(ValueError, match=r"unknown keys \['m'\]"):
        _config(allocation="owl", allocation_kwargs={"m": 5})
    with pytest.raises(ValueError, match="PruningConfig.allocation must be one of"):
        _config(allocation="best")
    _config(allocation="owl", structure="2:4")  # N:M: per-layer N_i:M patterns (tests/allocation/test_nm_allocation.py)


# ----- override --------------------------------------------------------------------------------------------------
def test_override_complete_dict_and_json(tmp_path):
    model = make_model("llama")
    names = list(block_linears(model))
    ratios = {n: (0.5 if i % 2 else 0.7) for i, n in enumerate(names)}
    numel = {n: weight_out_in(block_linears(model)[n]).numel() for n in names}
    target = sum(num_pruned(numel[n], r) for n, r in ratios.items()) / sum(numel.values())
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(ratios))
    config = _config(sparsity=target, layer_sparsity=str(path))
    assert config.layer_sparsity == ratios  # loaded into the config (JSON round-trip keeps the values)
    assert PruningConfig.from_dict(config.to_dict()).layer_sparsity == ratios
    pruner = SparsePruner(config)
    pruner.apply(model, dataset=make_ids(), progress=False)
    alloc = pruner.allocation
    assert alloc.method == "override" and alloc.pruned_params == alloc.target_params
    zeros = _zeros(model, names)
    for n in names:
        assert abs(zeros[n] - num_pruned(numel[n], ratios[n])) <= 1


def test_override_partial_keeps_budget():
    model = make_model("llama", num_layers=3)
    pinned = "model.layers.0.mlp.down_proj"
    alloc, modules = _allocate(model, sparsity=0.6, layer_sparsity={pinned: 0.2})
    assert alloc.pruned_params == alloc.target_params
    assert alloc.sparsities[pinned] == pytest.approx(0.2, abs=1 / alloc.numel[pinned])
    others = [s for n, s in alloc.sparsities.items() if n != pinned]
    assert min(others) > 0.6  # the others take over the budget the pinned layer gave up


def test_override_on_top_of_owl():
    model = make_model("llama", num_layers=3)
    pinned = "model.layers.2.self_attn.q_proj"
    alloc, _ = _allocate(model, sparsity=0.6, allocation="owl", layer_sparsity={pinned: 0.1})
    assert alloc.method == "owl+override" and alloc.pruned_params == alloc.target_params
    assert num_pruned(alloc.numel[pinned], alloc.sparsities[pinned]) == num_pruned(alloc.numel[pinned], 0.1)


@pytest.mark.parametrize("override,match", [
    ({"model.layers.9.mlp.down_proj": 0.5}, "not pruned targets of this model"),
    ({"model.layers.0.mlp.down_proj": 0.95, "model.layers.0.mlp.up_proj": 0.95, "model.layers.0.mlp.gate_proj": 0.95,
      "model.layers.1.mlp.down_proj": 0.95, "model.layers.1.mlp.up_proj": 0.95, "model.layers.1.mlp.gate_proj": 0.95},
     "no way to meet the target"),
])
def test_bad_override_fails_before_any_weight_change(override, match):
    model = make_model("llama")
    before = snapshot(model)
    pruner = SparsePruner(_config(sparsity=0.3, allocation="owl", layer_sparsity=override))
    with pytest.raises(ValueError, match=match):
        pruner.apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


def test_complete_override_off_target():
    model = make_model("llama")
    before = snapshot(model)
    override = {n: 0.5 for n in block_linears(model)}
    pruner = SparsePruner(_config(sparsity=0.6, layer_sparsity=override))
    with pytest.raises(ValueError, match="off the target sparsity 0.6000"):
        pruner.apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("value,match", [
    ({"a": 1.0}, r"layer_sparsity\['a'\] must be a sparsity in \[0, 1\)"),
    ({"a": -0.1}, r"must be a sparsity in \[0, 1\)"),
    ({}, "non-empty dict"),
    ("/no/such/file.json", "no JSON file"),
])
def test_bad_override_config(value, match):
    with pytest.raises(ValueError, match=match):
        _config(layer_sparsity=value)


# ----- CLI, record and card --------------------------------------------------------------------------------------
def test_cli_flags_build_the_config(monkeypatch, tmp_path):
    from optimum_sparse.cli import main as cli

    seen = {}

    def fake_load(args):
        seen["model"] = make_model("llama")
        return seen["model"], None

    monkeypatch.setattr(cli, "_load", fake_load)
    monkeypatch.setattr(SparsePruner, "prepare_calibration", lambda self, *a, **k: make_ids())
    out = tmp_path / "out"
    rc = cli.main(["prune", "--model", "x", "--method", "wanda", "--sparsity", "0.6", "--num-samples", "8",
                   "--seq-len", "16", "--allocation", "owl", "--allocation-kwargs", '{"M": 3, "lambda": 0.05}',
                   "--layer-sparsity", '{"model.layers.0.mlp.down_proj": 0.4}', "--output", str(out)])
    assert rc == 0
    with open(out / "pruning_config.json") as f:
        config = json.load(f)
    assert config["allocation"] == "owl" and config["allocation_kwargs"] == {"M": 3, "lambda": 0.05}
    assert config["layer_sparsity"] == {"model.layers.0.mlp.down_proj": 0.4}
    with open(out / "pruning_report.json") as f:
        report = json.load(f)
    assert report["allocation"]["method"] == "owl+override"
    assert report["allocation"]["pruned_params"] == report["allocation"]["target_params"]
    card = (out / "README.md").read_text()
    assert "| Layer-wise allocation | `owl+override` (M=3.0, base=owl, lambda=0.05)" in card
    assert "## Layer-wise allocation" in card and "| `model.layers.1` |" in card
    assert "--allocation owl" in card and "--layer-sparsity" in card
    assert os.path.isfile(out / "sparsity_plot.png")
    rc = cli.main(["prune", "--model", "x", "--allocation", "owl", "--allocation-kwargs", '{"lambda": 2}'])
    assert rc == 2  # a clear error, before the model is loaded
