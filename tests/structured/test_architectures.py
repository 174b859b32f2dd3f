"""Structured pruning on every architecture of the table: shapes, removed fraction, equality with the masked dense
model, save/reload, q/k norms, refusals before any change."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.errors import UnsupportedModelError
from optimum_sparse.structured.layout import get_structured_layout, structured_model_types
from optimum_sparse.structured.runner import plan_structured

from ..helpers import assert_state_unchanged, make_ids, snapshot, weight_out_in
from .archs import ARCHS, LAYOUT, LLAMA_LAYOUT, WHOLE_PROJECTION_NORM, blocks_of, make_arch, masked_dense

METHODS = ["wanda-structured", "flap", "structprune"]


def _config(method="flap", sparsity=0.3, structure="channels+heads", **kwargs):
    return PruningConfig(method=method, sparsity=sparsity, structure=structure, num_samples=8, seq_len=16,
                         batch_size=4, **kwargs)


def _prune(name, method="flap", sparsity=0.3, structure="channels+heads", **kwargs):
    model = make_arch(name)
    dense = copy.deepcopy(model)
    pruner = SparsePruner(_config(method, sparsity, structure, **kwargs))
    pruner.apply(model, dataset=make_ids(), progress=False)
    return dense, model, pruner


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_every_table_architecture_has_a_layout():
    expected = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2",
                "gpt_neox", "olmo2", "olmo3", "granite", "cohere", "falcon"}
    assert expected <= set(structured_model_types())


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_the_masked_dense_model(name, method):
    # OLMo-2/3 normalise q/k over every head: removing heads changes the others' scale, so only channels compare
    structure = "channels" if name in WHOLE_PROJECTION_NORM else "channels+heads"
    dense, model, pruner = _prune(name, method, structure=structure)
    ids = make_ids(2, 16, seed=5)
    pruned = _logits(model, ids)
    assert not torch.allclose(pruned, _logits(dense, ids), atol=1e-4)  # the comparison can fail
    torch.testing.assert_close(pruned, _logits(masked_dense(name, dense, model), ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_shapes_and_removed_fraction(name):
    dense, model, pruner = _prune(name, "wanda-structured", method_kwargs={"allocation": "threshold"})
    summary = pruner.structured_summary
    plan = plan_structured(dense, pruner.config)
    step = max(m.step * m.cost for m in plan.modules) / plan.prunable
    assert abs(summary["achieved_prunable_fraction"] - 0.3) <= step
    assert summary["model_params_after"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    attn_in, attn_out, _, mlp_in, mlp_out = LAYOUT.get(name, LLAMA_LAYOUT)
    geometry = plan.geometry
    hidden = dense.config.hidden_size
    for layer, block, dense_block in zip(summary["layers"], blocks_of(model), blocks_of(dense)):
        heads, channels = layer["num_attention_heads"], layer["intermediate_size"]
        assert channels % 8 == 0 and heads >= geometry.q_per_kv
        assert weight_out_in(block.get_submodule(attn_out)).shape == (hidden, heads * geometry.head_dim)
        assert weight_out_in(block.get_submodule(mlp_out)).shape == (hidden, channels)
        rows_in = weight_out_in(block.get_submodule(mlp_in)).shape[0]
        assert rows_in == channels * (2 if name == "phi3" else 1)
        # q/k/v rows: query heads plus key/value heads (multi-query Falcon keeps its single key/value head)
        kv = 1 if geometry.shared_kv else layer["num_key_value_heads"]
        rows = weight_out_in(block.get_submodule(attn_in)).shape[0]
        fused = LAYOUT.get(name, LLAMA_LAYOUT)[2] != "q"
        assert rows == (heads + 2 * kv) * geometry.head_dim if fused else rows == heads * geometry.head_dim
    ids = make_ids(2, 16, seed=3)
    assert torch.isfinite(_logits(model, ids)).all()


@pytest.mark.parametrize("name", ARCHS)
def test_save_and_reload_identical(name, tmp_path):
    _, model, pruner = _prune(name, "flap", method_kwargs={"allocation": "threshold"})
    fmt = pruner.structured_summary["format"]
    ids = make_ids(2, 16, seed=7)
    expected = _logits(model, ids)
    pruner.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert ("auto_map" in config) == (fmt == "per-layer")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=fmt == "per-layer").eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["olmo2", "olmo3", "cohere"])
def test_qk_norms_are_sliced_with_the_heads(name, tmp_path):
    dense, model, pruner = _prune(name, "wanda-structured", sparsity=0.5, structure="heads")
    geometry = plan_structured(dense, pruner.config).geometry
    for dense_block, block in zip(blocks_of(dense), blocks_of(model)):
        kept = weight_out_in(block.self_attn.k_proj)
        rows = (kept[:, None, :] == weight_out_in(dense_block.self_attn.k_proj)[None]).all(-1).float().argmax(1)
        kv_heads = rows.reshape(-1, geometry.head_dim)[:, 0] // geometry.head_dim
        q_heads = (kv_heads[:, None] * geometry.q_per_kv + torch.arange(geometry.q_per_kv)).reshape(-1)
        for norm, heads in (("q_norm", q_heads), ("k_norm", kv_heads)):
            old, new = getattr(dense_block.self_attn, norm).weight, getattr(block.self_attn, norm).weight
            if name == "cohere":  # [heads, head_dim]
                expected = old[heads]
            else:  # [heads · head_dim]
                expected = old.reshape(-1, geometry.head_dim)[heads].reshape(-1)
            assert torch.equal(new, expected)
    ids = make_ids(2, 16, seed=7)
    expected = _logits(model, ids)
    assert torch.isfinite(expected).all()
    pruner.save_pretrained(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["phi3", "falcon", "gpt_neox", "olmo2"])
def test_impossible_targets_fail_before_any_change(name):
    model = make_arch(name)
    before = snapshot(model)
    with pytest.raises(ValueError, match="more heads/channels than exist"):
        SparsePruner(_config("structprune", sparsity=0.9, structure="heads")).apply(model, dataset=make_ids(),
                                                                                      progress=False)
    assert_state_unchanged(model, before)


def test_falcon_alibi_is_refused_before_any_change():
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "falcon", vocab_size=128, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, alibi=True))
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="alibi=True"):
        SparsePruner(_config()).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


def test_model_without_layout_is_refused_naming_what_is_missing():
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "bloom", vocab_size=128, hidden_size=32, n_head=4, n_layer=2))
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="no structured layout .* 'bloom'|'bloom': no structured layout"):
        SparsePruner(_config()).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)
    with pytest.raises(UnsupportedModelError, match="add a `structured` layout"):
        get_structured_layout(model)


@pytest.mark.parametrize("name, budget", [("phi3", "params"), ("gpt_neox", "params"), ("falcon", "latency"),
                                          ("falcon-new", "params"), ("cohere", "latency")])
def test_structured_search_on_other_layouts(name, budget, tmp_path):
    kwargs = {"generations": 1, "rounds": 1, "offspring": 2, "survivors": 1, "levels": 1, "budget": budget}
    if budget == "latency":
        kwargs["latency_repeats"] = 1
    _, model, pruner = _prune(name, "wanda-structured", allocation="search", allocation_kwargs=kwargs)
    structured = pruner.allocation.info["structured"]
    if budget == "params":
        assert structured["removed_params"] == structured["start_removed_params"]
    else:
        latency = pruner.allocation.info["latency"]
        assert latency["achieved_latency"] <= latency["start_latency"]
    ids = make_ids(2, 16, seed=3)
    expected = _logits(model, ids)
    pruner.save_pretrained(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, trust_remote_code=pruner.structured_summary["format"] != "stock").eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=1e-5)


def test_multi_query_budget_counts_only_query_rows():
    dense, model, pruner = _prune("falcon", "wanda-structured", sparsity=0.5, structure="heads")
    summary = pruner.structured_summary
    plan = plan_structured(dense, pruner.config)
    hidden, head_dim = dense.config.hidden_size, plan.geometry.head_dim
    assert all(m.cost == head_dim * hidden * 2 for m in plan.modules)  # q rows + dense columns, no bias
    removed = summary["prunable_params_before"] - summary["prunable_params_after"]
    assert removed == sum(m.cost * (m.groups - l["num_attention_heads"]) for m, l in zip(plan.modules, summary["layers"]))
    # the uniform rule keeps one common count: within half a step of every block at once
    common_step = sum(m.cost for m in plan.modules) / plan.prunable
    assert abs(summary["achieved_prunable_fraction"] - 0.5) <= common_step / 2 + 1e-9
