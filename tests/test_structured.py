"""Structured pruning: shapes, budgets, equality with the masked dense model, save/reload, errors, the math."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn
import transformers

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.methods.structprune import admm_group_support
from optimum_sparse.structured.allocation import (
    ModuleBudget, round_to_budget, softmax_allocation, threshold_allocation, uniform_allocation,
)
from optimum_sparse.structured.runner import plan_structured
from optimum_sparse.structured.scoring import damped, expand_groups, greedy_obs, solve_on_support, support_error

from .helpers import assert_state_unchanged, block_path, make_ids, make_model, snapshot, weight_out_in

ARCHS = ["llama", "qwen2", "opt", "gpt2"]
METHODS = ["wanda-structured", "flap", "structprune"]
# (q/k/v input projections or fused qkv, output projection) and (MLP inputs, MLP output), relative to a block
NAMES = {
    "llama": (("self_attn.k_proj",), "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    "qwen2": (("self_attn.k_proj",), "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    "opt": (("self_attn.k_proj",), "self_attn.out_proj", ("fc1",), "fc2"),
    "gpt2": (("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj"),
}


def _config(method, sparsity=0.3, structure="channels+heads", **kwargs):
    return PruningConfig(method=method, sparsity=sparsity, structure=structure, num_samples=8, seq_len=16,
                         batch_size=4, **kwargs)


def _prune(arch, method, sparsity=0.3, structure="channels+heads", num_layers=2, **kwargs):
    model = make_model(arch, num_layers=num_layers)
    dense = copy.deepcopy(model)
    pruner = SparsePruner(_config(method, sparsity, structure, **kwargs))
    pruner.apply(model, dataset=make_ids(), progress=False)
    return dense, model, pruner


def _kept_rows(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Index in `old` of every row of `new` (rows of input projections are copied unchanged)."""
    match = (new[:, None, :] == old[None, :, :]).all(-1)
    assert bool((match.sum(1) >= 1).all()), "a kept row is not a copy of an original row"
    return match.float().argmax(1)


def _masked_dense(arch: str, dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """The dense model with the removed heads/channels masked out: zero output-projection columns, and the pruned
    model's (compensated) kept columns and bias written in place."""
    masked = copy.deepcopy(dense)
    prefix = block_path(masked)
    cfg = dense.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    q_per_kv = heads // (getattr(cfg, "num_key_value_heads", None) or heads)
    attn_inputs, o_name, mlp_inputs, down_name = NAMES[arch]
    for index, (mblock, pblock) in enumerate(zip(masked.get_submodule(prefix), pruned.get_submodule(prefix))):
        # attention: rows of k (or the key part of c_attn) identify the kept KV groups
        old = weight_out_in(mblock.get_submodule(attn_inputs[0]))
        new = weight_out_in(pblock.get_submodule(attn_inputs[0]))
        if arch == "gpt2":  # fused [q; k; v]: the query part comes first
            old, new = old[: old.shape[0] // 3], new[: new.shape[0] // 3]
        rows = _kept_rows(new, old)
        groups = rows.reshape(-1, head_dim)[:, 0] // head_dim
        cols = expand_groups(groups, head_dim * q_per_kv)
        _write_masked(mblock, pblock, o_name, cols)
        rows = _kept_rows(weight_out_in(pblock.get_submodule(mlp_inputs[0])), weight_out_in(mblock.get_submodule(mlp_inputs[0])))
        _write_masked(mblock, pblock, down_name, rows)
    return masked


def _write_masked(mblock, pblock, name, cols):
    dense_mod, pruned_mod = mblock.get_submodule(name), pblock.get_submodule(name)
    weight = torch.zeros_like(weight_out_in(dense_mod))
    weight[:, cols] = weight_out_in(pruned_mod)
    if type(dense_mod).__name__ == "Conv1D":
        dense_mod.weight.data.copy_(weight.t())
        dense_mod.bias.data.copy_(pruned_mod.bias.data)
        return
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=pruned_mod.bias is not None)
    linear.weight.data.copy_(weight)
    if pruned_mod.bias is not None:
        linear.bias.data.copy_(pruned_mod.bias.data)
    parent, _, child = name.rpartition(".")
    setattr(mblock.get_submodule(parent), child, linear)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_pruned_model_matches_masked_dense_and_budget(arch, method):
    dense, model, pruner = _prune(arch, method)
    summary = pruner.structured_summary
    ids = make_ids(2, 16, seed=5)
    torch.testing.assert_close(_logits(model, ids), _logits(_masked_dense(arch, dense, model), ids), atol=1e-5, rtol=1e-4)
    # target fraction of the prunable parameters, within the rounding of whole KV groups and multiple_of channels
    plan = plan_structured(dense, pruner.config)
    step = max(m.step * m.cost for m in plan.modules) / plan.prunable
    assert abs(summary["achieved_prunable_fraction"] - 0.3) <= step
    removed = summary["model_params_before"] - summary["model_params_after"]
    assert removed == summary["prunable_params_before"] - summary["prunable_params_after"] > 0
    assert summary["model_params_after"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # every layer: whole KV groups with their query heads, channels a multiple of multiple_of
    q_per_kv = dense.config.num_attention_heads // (getattr(dense.config, "num_key_value_heads", None) or dense.config.num_attention_heads)
    head_dim = dense.config.hidden_size // dense.config.num_attention_heads
    attn_inputs, o_name, mlp_inputs, down_name = NAMES[arch]
    blocks = model.get_submodule(block_path(model))
    for layer, block in zip(summary["layers"], blocks):
        assert layer["num_attention_heads"] == layer["num_key_value_heads"] * q_per_kv >= q_per_kv
        assert layer["intermediate_size"] % 8 == 0 and layer["intermediate_size"] >= 8
        hidden = dense.config.hidden_size
        assert weight_out_in(block.get_submodule(o_name)).shape == (hidden, layer["num_attention_heads"] * head_dim)
        kv_rows = layer["num_key_value_heads"] * head_dim * (3 if arch == "gpt2" else 1)
        assert weight_out_in(block.get_submodule(attn_inputs[0])).shape == (kv_rows, hidden)
        assert weight_out_in(block.get_submodule(down_name)).shape == (hidden, layer["intermediate_size"])
        for name in mlp_inputs:
            assert weight_out_in(block.get_submodule(name)).shape == (layer["intermediate_size"], hidden)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["wanda-structured", "structprune"])
def test_save_and_reload_identical(arch, method, tmp_path):
    _, model, pruner = _prune(arch, method)
    ids = make_ids(2, 16, seed=7)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "plain")
    pruner.save_pretrained(model, tmp_path / "pruner")
    for folder in ("plain", "pruner"):
        path = tmp_path / folder
        config = json.loads((path / "config.json").read_text())
        stock = pruner.structured_summary["format"] == "stock"
        assert ("auto_map" in config) == (not stock)
        assert os.path.isfile(path / "modeling_pruned.py") == (not stock)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=not stock).eval()
        torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-6, rtol=1e-5)
        assert config["structured_pruning"]["achieved_prunable_fraction"] == pytest.approx(
            pruner.structured_summary["achieved_prunable_fraction"])


def test_uniform_llama_uses_the_stock_config(tmp_path):
    _, model, pruner = _prune("llama", "wanda-structured", sparsity=0.5)
    assert pruner.structured_summary["format"] == "stock"
    assert type(model) is transformers.LlamaForCausalLM
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.config.intermediate_size == 32  # 64 channels → half, a multiple of 8
    assert model.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # no remote code needed
    ids = make_ids(2, 16)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))


def test_non_uniform_sizes_use_per_layer_format():
    _, model, pruner = _prune("qwen2", "structprune", num_layers=3, method_kwargs={"allocation": "threshold"})
    layers = pruner.structured_summary["layers"]
    if len({(l["num_key_value_heads"], l["intermediate_size"]) for l in layers}) == 1 and not any(
            "bias" in n for n in model.config.to_dict().get("pruned_modules", {})):
        pytest.skip("allocation happened to be uniform")
    assert pruner.structured_summary["format"] == "per-layer"
    assert type(model).__name__ == "PrunedQwen2ForCausalLM"
    assert isinstance(model, transformers.Qwen2ForCausalLM)
    for name, (out_f, in_f, has_bias) in model.config.pruned_modules.items():
        module = model.get_submodule(name)
        assert tuple(module.weight.shape) == (out_f, in_f) and (module.bias is not None) == has_bias


@pytest.mark.parametrize("method", METHODS + ["magnitude-structured"])
def test_zero_sparsity_leaves_model_unchanged(method):
    model = make_model("llama")
    before = snapshot(model)
    ids = make_ids(2, 16)
    expected = _logits(model, ids)
    config_before = model.config.to_dict()
    pruner = SparsePruner(_config(method, sparsity=0.0))
    pruner.apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)
    torch.testing.assert_close(_logits(model, ids), expected, atol=0, rtol=0)
    after = model.config.to_dict()
    after.pop("structured_pruning")
    assert after == config_before and type(model) is transformers.LlamaForCausalLM
    assert pruner.structured_summary["achieved_prunable_fraction"] == 0.0


def test_heads_only_and_channels_only():
    _, model, pruner = _prune("llama", "flap", sparsity=0.4, structure="channels")
    assert all(l["num_key_value_heads"] == 2 for l in pruner.structured_summary["layers"])
    assert model.model.layers[0].self_attn.o_proj.weight.shape == (32, 32)
    _, model, pruner = _prune("opt", "wanda-structured", sparsity=0.5, structure="heads")
    assert all(l["intermediate_size"] == 64 for l in pruner.structured_summary["layers"])
    assert all(l["num_attention_heads"] == 2 for l in pruner.structured_summary["layers"])
    assert pruner.structured_summary["achieved_prunable_fraction"] == pytest.approx(0.5, abs=0.01)


def test_magnitude_structured_is_data_free():
    model = make_model("gpt2")
    pruner = SparsePruner(_config("magnitude-structured", 0.25))
    assert pruner.prepare_calibration(model) is None
    pruner.apply(model, progress=False)
    assert pruner.structured_summary["achieved_prunable_fraction"] > 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="structprune", structure="heads", sparsity=0.6), "more heads/channels than exist"),
    (dict(method="flap", structure="channels", sparsity=0.95), "more heads/channels than exist"),
])
def test_impossible_targets_fail_before_any_change(kwargs, message):
    model = make_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        SparsePruner(PruningConfig(num_samples=8, seq_len=16, **kwargs)).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)
    assert type(model) is transformers.LlamaForCausalLM


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="structprune", sparsity=1.0, structure="channels"), "sparsity must be in"),
    (dict(method="wanda", structure="channels"), "needs a structured method"),
    (dict(method="structprune", structure="unstructured"), "must be one of 'channels'"),
    (dict(method="structprune", structure="rows"), r"'channels\+heads', 'experts', 'expert-channels'\), got 'rows'"),
    (dict(method="flap", structure="heads", multiple_of=0), "multiple_of"),
    (dict(method="structprune", structure="heads", method_kwargs={"allocation": "owl"}), "allocation"),
    (dict(method="structprune", structure="heads", method_kwargs={"temperature": 0}), "temperature"),
    (dict(method="wanda-structured", structure="heads", method_kwargs={"rho": 1.0}), "unknown keys"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_unsupported_architecture_fails_before_any_change():
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "bloom", vocab_size=128, hidden_size=32, n_head=4, n_layer=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="Structured pruning supports model types"):
        SparsePruner(_config("flap")).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


def test_config_round_trip():
    config = _config("structprune", 0.2, multiple_of=64, method_kwargs={"allocation": "threshold"})
    again = PruningConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config and again.is_structured and again.multiple_of == 64


# ----- allocation --------------------------------------------------------------------------------------------------
def _modules():
    return [ModuleBudget(key=(i, "channels"), groups=64, cost=96, step=8, params=64 * 96) for i in range(4)] + [
        ModuleBudget(key=(i, "heads"), groups=4, cost=1024, step=1, params=4 * 1024) for i in range(4)]


def test_round_to_budget_meets_the_budget_within_one_step():
    modules = _modules()
    total = sum(m.params for m in modules)
    for sparsity in (0.1, 0.3, 0.55):
        keeps = round_to_budget(modules, [sparsity * m.groups * 1.3 if m.key[1] == "heads" else 0.0 for m in modules],
                                sparsity * total)
        removed = sum((m.groups - k) * m.cost for m, k in zip(modules, keeps))
        assert abs(removed - sparsity * total) <= 8 * 96
        for m, k in zip(modules, keeps):
            assert k in m.options()


def test_uniform_allocation_gives_equal_sizes():
    modules = _modules()
    keeps = uniform_allocation(modules, 0.3)
    assert len(set(keeps[:4])) == 1 and len(set(keeps[4:])) == 1


def test_threshold_allocation_removes_the_cheapest_groups():
    modules = _modules()
    scores = [torch.full((m.groups,), 10.0) for m in modules]
    scores[2] = torch.linspace(0.0, 1.0, 64)  # module 2's channels are the cheapest
    keeps = threshold_allocation(modules, scores, 0.1)
    assert keeps[2] < 64 and all(k == m.groups for j, (k, m) in enumerate(zip(keeps, modules)) if j != 2)


def test_softmax_allocation_interpolates_between_uniform_and_energy():
    modules = [ModuleBudget(key=(i, "channels"), groups=256, cost=10, step=8, params=2560) for i in range(4)]
    scores = [torch.rand(256, generator=torch.Generator().manual_seed(i)) * 10.0 ** i for i in range(4)]
    hot = softmax_allocation(modules, scores, 0.3, temperature=0.5, max_deviation=0.2)
    cold = softmax_allocation(modules, scores, 0.3, temperature=1e6, max_deviation=0.2)
    assert max(cold) - min(cold) <= 8  # T → ∞: uniform up to one rounding step
    assert hot[0] < hot[3]  # the low-energy module loses more
    for keeps in (hot, cold):
        removed = sum((m.groups - k) * m.cost for m, k in zip(modules, keeps))
        assert abs(removed - 0.3 * 4 * 2560) <= 8 * 10
        assert all(0.1 - 8 / 256 <= 1 - k / 256 <= 0.5 + 8 / 256 for k in keeps), keeps


# ----- the compensation math ---------------------------------------------------------------------------------------
def _problem(seed=0, n=512, d=48, out=20):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    return W, X


def test_solve_on_support_is_least_squares():
    W, X = _problem()
    H = X.t() @ X
    cols = torch.arange(0, 48, 2)
    ours = solve_on_support(W, H, cols)
    ref = torch.linalg.lstsq(X[:, cols], X @ W.t()).solution.t()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("width", [1, 4])
def test_admm_and_greedy_obs_beat_unweighted_selection(width):
    W, X = _problem(seed=1)
    H = damped(X.t() @ X, 0.01)
    G = 48 // width
    keep = G // 2
    total = float(torch.einsum("oi,ij,oj->", W, H, W))

    def err(groups):
        cols = expand_groups(groups.sort().values, width)
        return support_error(W, solve_on_support(W, H, cols), H, cols) / total

    admm, _ = admm_group_support(W, H, width, keep)
    greedy = greedy_obs(W, H, width, keep)
    naive = torch.topk(W.pow(2).sum(0).reshape(G, width).sum(1), keep).indices  # magnitude, no activations
    assert len(admm) == len(greedy) == keep
    assert min(err(admm), err(greedy)) < err(naive)
    # compensation always helps: the least-squares weights beat keeping the columns as they are
    cols = expand_groups(greedy, width)
    assert err(greedy) < support_error(W, W[:, cols], H, cols) / total


def test_structprune_error_not_worse_than_wanda_structured():
    errors = {}
    for method in ("wanda-structured", "structprune"):
        dense, model, pruner = _prune("llama", method, structure="channels", sparsity=0.5,
                                      **({"method_kwargs": {"allocation": "uniform"}} if method == "structprune" else {}))
        ids = make_ids()
        errors[method] = float((_logits(model, ids) - _logits(dense, ids)).pow(2).mean())
    assert errors["structprune"] < errors["wanda-structured"]


def test_cli_prunes_structurally(tmp_path, tokenizer, capsys):
    from optimum_sparse.cli.main import main

    from .helpers import save_model_and_text

    dense, text = save_model_and_text(tmp_path, tokenizer)
    code = main(["prune", "--model", str(dense), "--method", "wanda-structured", "--structure", "channels",
                 "--sparsity", "0.25", "--multiple-of", "16", "--num-samples", "4", "--seq-len", "16",
                 "--dataset", str(text), "--output", str(tmp_path / "out")])
    assert code == 0
    assert "of the prunable parameters" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.intermediate_size == 48  # 64 → 25% removed, a multiple of 16
    assert json.loads((tmp_path / "out" / "pruning_config.json").read_text())["multiple_of"] == 16


def test_bfloat16_model_keeps_its_dtype():
    model = make_model("qwen2", dtype=torch.bfloat16)
    SparsePruner(_config("structprune", 0.3)).apply(model, dataset=make_ids(), progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(_logits(model, make_ids(2, 16)).float()).all()


def test_pruning_a_pruned_model_again_round_trips(tmp_path):
    _, model, _ = _prune("llama", "flap", sparsity=0.25, structure="channels")
    first = dict(model.config.pruned_modules)
    SparsePruner(_config("structprune", 0.3, structure="channels")).apply(model, dataset=make_ids(), progress=False)
    assert set(first) <= set(model.config.pruned_modules)
    ids = make_ids(2, 16, seed=3)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-6, rtol=1e-5)


def test_record_of_a_structured_run(tmp_path):
    from optimum_sparse.serialization import load_pruning_record

    _, model, pruner = _prune("gpt2", "flap")
    pruner.save_pretrained(model, tmp_path)
    record = load_pruning_record(tmp_path, load_masks=False)
    assert record.config.structure == "channels+heads" and record.method == "flap"
    removed = {layer.name: layer.extra["removed_fraction"] for layer in record.layers}
    assert any(v > 0 for v in removed.values())
    card = (tmp_path / "README.md").read_text()
    assert "structured" in card and "`trust_remote_code=True` in transformers only" in card


def test_structured_refuses_the_unstructured_allocators():
    with pytest.raises(ValueError, match="structured methods allocate"):
        PruningConfig(method="structprune", sparsity=0.3, structure="channels", allocation="owl")
