"""`uniform_shapes=True`: the same head/channel counts in every block, the stock config, loads without remote code."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.engine.architectures import ARCHITECTURES
from optimum_sparse.structured.allocation import ModuleBudget, pooled_common_sizes, threshold_allocation

from ..helpers import assert_state_unchanged, make_ids, snapshot, weight_out_in
from .archs import ARCH_CONFIGS, ARCHS, blocks_of, make_arch, masked_dense

STOCK_HEADS = [n for n in ARCHS if getattr(ARCHITECTURES[ARCH_CONFIGS[n][0]].structured, "stock_heads", False)]


def _config(method="wanda-structured", sparsity=0.3, structure="channels+heads", **kwargs):
    return PruningConfig(method=method, sparsity=sparsity, structure=structure, num_samples=8, seq_len=16,
                         batch_size=4, uniform_shapes=True, **kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ARCHS)
def test_stock_form_reloads_without_remote_code(name, tmp_path):
    model = make_arch(name)
    stock_class = type(model)
    structure = "channels+heads" if name in STOCK_HEADS else "channels"
    pruner = SparsePruner(_config(structure=structure, method_kwargs={"allocation": "threshold"}))
    pruner.apply(model, dataset=make_ids(), progress=False)
    summary = pruner.structured_summary
    assert summary["format"] == "stock" and summary["uniform_shapes"] and type(model) is stock_class
    assert len({(l["num_key_value_heads"], l["intermediate_size"]) for l in summary["layers"]}) == 1
    assert summary["achieved_prunable_fraction"] > 0.1
    layer = summary["layers"][0]
    spec = ARCHITECTURES[ARCH_CONFIGS[name][0]].structured
    layout = spec if not callable(spec) else spec(model.config)
    assert getattr(model.config, layout.mlp_field) == layer["intermediate_size"]
    if structure != "channels":
        assert getattr(model.config, layout.heads_field) == layer["num_attention_heads"]
    ids = make_ids(2, 16, seed=7)
    expected = _logits(model, ids)
    pruner.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and "pruned_modules" not in config
    assert not os.path.isfile(tmp_path / "modeling_pruned.py")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert type(loaded) is stock_class
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["flap", "structprune"])
def test_compensation_biases_become_stock_config_fields(method, tmp_path):
    model = make_arch("llama")
    dense = copy.deepcopy(model)
    pruner = SparsePruner(_config(method))
    pruner.apply(model, dataset=make_ids(), progress=False)
    assert pruner.structured_summary["format"] == "stock" and type(model) is transformers.LlamaForCausalLM
    block = blocks_of(model)[0]
    assert model.config.mlp_bias and torch.count_nonzero(block.mlp.down_proj.bias) > 0  # the compensation
    assert torch.count_nonzero(block.mlp.up_proj.bias) == 0  # zero biases the stock layout needs
    heads_removed = model.config.num_key_value_heads < dense.config.num_key_value_heads
    assert model.config.attention_bias == heads_removed
    if heads_removed:
        assert torch.count_nonzero(block.self_attn.q_proj.bias) == 0
    ids = make_ids(2, 16, seed=5)
    torch.testing.assert_close(_logits(model, ids), _logits(masked_dense("llama", dense, model), ids),
                               atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-6, rtol=1e-5)


def test_pooled_allocation_keeps_the_rules_split_between_kinds():
    modules = [ModuleBudget(key=(i, "heads"), groups=4, cost=1024, step=1, params=4 * 1024) for i in range(4)]
    modules += [ModuleBudget(key=(i, "channels"), groups=64, cost=96, step=8, params=64 * 96) for i in range(4)]
    # heads score high (expensive to remove): the threshold rule takes the budget from the channels
    scores = [torch.full((4,), 10.0) for _ in range(4)] + [torch.linspace(0, 1, 64) * (i + 1) for i in range(4)]
    rule = threshold_allocation(modules, scores, 0.3)
    assert len(set(rule[4:])) > 1  # per block, the rule differs
    kept = pooled_common_sizes(modules, rule, 0.3)
    assert len(set(kept[:4])) == 1 and len(set(kept[4:])) == 1
    assert kept[0] == 4  # no head removed, as the rule decided
    removed = sum((m.groups - k) * m.cost for m, k in zip(modules, kept))
    budget = 0.3 * sum(m.params for m in modules)
    assert abs(removed - budget) <= 4 * 8 * 96 / 2 + 1e-9  # within half a common step of the channels


@pytest.mark.parametrize("name, kwargs, message", [
    ("gpt2", {}, "derives head_dim from hidden_size"),
    ("falcon", {}, "derives head_dim from hidden_size"),
    ("qwen2", {"method": "flap"}, "adds a bias to self_attn.o_proj"),
    ("gemma", {"method": "structprune", "structure": "channels"}, "adds a bias to mlp.down_proj"),
])
def test_refused_before_any_change(name, kwargs, message):
    model = make_arch(name)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        SparsePruner(_config(**kwargs)).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


def test_structprune_without_bias_correction_is_stock_on_qwen2(tmp_path):
    model = make_arch("qwen2")
    SparsePruner(_config("structprune", method_kwargs={"bias_correction": False})).apply(
        model, dataset=make_ids(), progress=False)
    assert type(model) is transformers.Qwen2ForCausalLM
    assert weight_out_in(blocks_of(model)[0].self_attn.o_proj).shape[1] == model.config.num_attention_heads * 8


def test_a_model_pruned_per_layer_is_refused():
    model = make_arch("llama")
    SparsePruner(PruningConfig(method="flap", sparsity=0.3, structure="channels", num_samples=8, seq_len=16)).apply(
        model, dataset=make_ids(), progress=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already have different head/channel counts"):
        SparsePruner(_config(structure="channels")).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


def test_uniform_shapes_needs_a_structured_structure():
    with pytest.raises(ValueError, match="uniform_shapes=True applies to structured pruning"):
        PruningConfig(method="wanda", uniform_shapes=True)
    with pytest.raises(ValueError, match="must be True or False"):
        PruningConfig(method="flap", structure="channels", uniform_shapes="yes")


def test_cli_flag(tmp_path, tokenizer):
    from optimum_sparse.cli.main import main

    from ..helpers import save_model_and_text

    dense, text = save_model_and_text(tmp_path, tokenizer)
    code = main(["prune", "--model", str(dense), "--method", "flap", "--structure", "channels+heads",
                 "--sparsity", "0.3", "--uniform-shapes", "--num-samples", "4", "--seq-len", "16",
                 "--dataset", str(text), "--output", str(tmp_path / "out")])
    assert code == 0
    assert json.loads((tmp_path / "out" / "pruning_config.json").read_text())["uniform_shapes"] is True
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock: no remote code
    assert type(loaded) is transformers.LlamaForCausalLM and loaded.config.intermediate_size < 64
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`uniform_shapes=True`" in card and "loads without `trust_remote_code`" in card


def test_search_picks_the_best_heads_channels_split(tmp_path):
    model = make_arch("llama")
    config = _config("structprune", allocation="search", allocation_kwargs={"search_samples": 4})
    pruner = SparsePruner(config)
    pruner.apply(model, dataset=make_ids(), progress=False)
    info = pruner.allocation.info
    rows = info["candidates"]
    assert len(rows) == 2  # 1 or 2 KV groups kept per block
    assert {r["kept"]["heads"] for r in rows} == {1, 2}
    assert all(r["fitness"] > 0 for r in rows) and rows[0]["fitness"] != rows[1]["fitness"]  # scored pruned copies
    best = min(rows, key=lambda r: r["fitness"])
    layer = pruner.structured_summary["layers"][0]
    assert (layer["num_key_value_heads"], layer["intermediate_size"]) == (best["kept"]["heads"], best["kept"]["channels"])
    assert pruner.structured_summary["format"] == "stock"
    ids = make_ids(2, 16, seed=2)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids),
                               expected, atol=1e-6, rtol=1e-5)


def test_search_settings_of_the_evolution_are_refused_under_uniform_shapes():
    with pytest.raises(ValueError, match="do not apply to allocation='search' with uniform_shapes=True"):
        _config("structprune", allocation="search", allocation_kwargs={"generations": 3})
