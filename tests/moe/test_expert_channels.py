"""Expert-channel pruning (`structure="expert-channels"`, method `"expert-channels"`) on tiny random MoE models."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.engine.experts import ExpertLinear, find_experts_modules
from optimum_sparse.structured.expert_channels import plan_expert_channels

from ..helpers import assert_state_unchanged, make_ids, make_model, snapshot
from .helpers import MOE_TYPES, make_moe

# the types whose shared expert is sized by the routed experts' own config field: pruned with them
COUPLED = {"deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts", "llama4_text": "shared_expert"}
WIDTH_FIELD = {"qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size",
               "qwen3_next": "moe_intermediate_size", "deepseek_v2": "moe_intermediate_size",
               "deepseek_v3": "moe_intermediate_size"}  # the others: intermediate_size


def _config(sparsity=0.5, **kwargs):
    return PruningConfig(method="expert-channels", structure="expert-channels", sparsity=sparsity, num_samples=8,
                         seq_len=16, batch_size=4, **kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _masked_dense(dense, blocks):
    """The dense model with each expert's removed channels zeroed (their down-projection columns)."""
    layers = dense.model.layers
    for entry in blocks:
        if "shared_expert" in entry:
            with torch.no_grad():
                dense.get_submodule(entry["shared_expert"]).down_proj.weight[:, entry["removed_channels"]] = 0
            continue
        ((name, (experts, layout)),) = find_experts_modules(layers[entry["index"]]).items()
        with torch.no_grad():
            for e, removed in enumerate(entry["removed_channels"]):
                ExpertLinear(experts, e, "down_proj", layout).weight[:, removed] = 0
    return dense


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_expert_channels_equal_the_masked_dense_model_and_reload_with_stock_transformers(model_type, tmp_path):
    model = make_moe(model_type)
    dense = copy.deepcopy(model)
    ids = make_ids()
    field = WIDTH_FIELD.get(model_type, "intermediate_size")
    width = getattr(model.config, field)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pruner = SparsePruner(_config(0.5))
    pruner.apply(model, dataset=ids, progress=False)
    keep = width // 2
    summary = pruner.structured_summary
    assert getattr(model.config, field) == keep and summary["config_field"] == field
    assert summary["channels_before"] == width and summary["channels_after"] == keep
    changed = {n for n, p in model.named_parameters() if tuple(p.shape) != shapes[n]}
    shared = COUPLED.get(model_type)
    assert changed and all(".experts." in n or (shared and f".{shared}." in n) for n in changed)
    assert bool(shared) == bool(summary["shared_experts_pruned"])
    for name in changed:  # exactly the intermediate dimension halves
        before, after = shapes[name], tuple(model.get_parameter(name).shape)
        assert sorted(a * 2 if a != b else a for a, b in zip(after, before)) == sorted(before)
    for entry in pruner.report.blocks:
        if "shared_expert" in entry:  # pruned to the same fraction
            assert entry["channels_after"] * 2 == entry["channels_before"] == len(entry["removed_channels"]) * 2
            continue
        assert all(len(r) == width - keep and len(set(r)) == width - keep for r in entry["removed_channels"])
    # the recorded fractions are measured on the weights
    expert_before = sum(torch.Size(shapes[n]).numel() for n in changed)
    expert_after = sum(model.get_parameter(n).numel() for n in changed)
    assert summary["achieved_prunable_fraction"] == pytest.approx(1 - expert_after / expert_before)
    assert summary["model_params_after"] == sum(p.numel() for p in model.parameters())
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _logits(_masked_dense(dense, pruner.report.blocks), ids), rtol=1e-5, atol=1e-5)
    pruner.save_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock class, no trust_remote_code
    assert type(reloaded) is type(model) and getattr(reloaded.config, field) == keep
    torch.testing.assert_close(_logits(reloaded, ids), logits, rtol=0, atol=0)
    with open(os.path.join(tmp_path, "pruning_report.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert [b["removed_channels"] for b in saved["blocks"]] == [b["removed_channels"] for b in pruner.report.blocks]
    card = open(os.path.join(tmp_path, "README.md"), encoding="utf-8").read()
    assert f"{width - keep} of {width} intermediate channels in every expert" in card


def test_fluctuation_criterion_and_channels_chosen_per_expert():
    model = make_moe("qwen3_moe")
    dense = copy.deepcopy(model)
    ids = make_ids()
    pruner = SparsePruner(_config(0.5, method_kwargs={"criterion": "fluctuation"}))
    pruner.apply(model, dataset=ids, progress=False)
    assert pruner.structured_summary["criterion"] == "fluctuation"
    torch.testing.assert_close(_logits(model, ids), _logits(_masked_dense(dense, pruner.report.blocks), ids),
                               rtol=1e-5, atol=1e-5)
    removed = pruner.report.blocks[0]["removed_channels"]
    assert len({tuple(r) for r in removed}) > 1  # each expert chooses its own channels


def test_scores_follow_the_routed_activations():
    """Block 0's kept channels equal a Wanda-structured reference computed by routing the tokens by hand."""
    model = make_moe("mixtral")
    ids = make_ids()
    captured = []
    layer = model.model.layers[0].mlp
    handle = layer.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    _logits(model, ids)
    handle.remove()
    x = torch.cat(captured).double()
    probs = torch.softmax(x @ layer.gate.weight.double().t(), dim=-1)
    top, index = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    experts = layer.experts
    f = experts.down_proj.shape[2]
    expected = []
    for e in range(experts.gate_up_proj.shape[0]):
        token, slot = (index == e).nonzero(as_tuple=True)
        w = top[token, slot]
        gate, up = (x[token] @ experts.gate_up_proj[e].double().t()).chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up
        score = experts.down_proj[e].double().norm(dim=0) * (w[:, None] ** 2 * a ** 2).sum(0).sqrt()
        expected.append(sorted(set(range(f)) - set(score.topk(f // 2).indices.tolist())))
    pruner = SparsePruner(_config(0.5))
    pruner.apply(model, dataset=ids, progress=False)
    assert pruner.report.blocks[0]["removed_channels"] == expected
    assert sum(pruner.report.blocks[0]["tokens"]) == 2 * ids.numel()


def test_zero_token_expert_falls_back_to_magnitude_and_is_recorded():
    model = make_moe("gpt_oss")
    with torch.no_grad():
        model.model.layers[0].mlp.router.bias[0] = -1e4  # expert 0 of block 0 never routed
    pruner = SparsePruner(_config(0.5))
    pruner.apply(model, dataset=make_ids(), progress=False)
    block = pruner.report.blocks[0]
    assert block["tokens"][0] == 0 and 0 in block["magnitude_fallback"]
    assert pruner.structured_summary["magnitude_fallback"]["model.layers.0.mlp.experts"] == block["magnitude_fallback"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    experts = model.model.layers[0].mlp.experts
    down = experts.down_proj  # [E, f, d] (transposed layout)
    assert down.shape[1] == 32 and experts.intermediate_size == 32


def test_every_expert_under_the_token_threshold_uses_magnitude():
    model = make_moe("olmoe")
    pruner = SparsePruner(_config(0.5, min_expert_tokens=10 ** 6))
    pruner.apply(model, dataset=make_ids(), progress=False)
    assert all(b["magnitude_fallback"] == [0, 1, 2, 3] for b in pruner.report.blocks)


def test_a_config_field_that_does_not_describe_the_experts_is_refused_before_any_change():
    model = make_moe("mixtral")
    model.config.intermediate_size = 48  # the experts are 64 wide
    before = snapshot(model)
    with pytest.raises(ValueError, match="no config field holds the expert width 64"):
        SparsePruner(_config(0.5)).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)
    model = make_moe("llama4_text")  # the field also sizes the shared expert: refused when it is not a plain MLP
    model.model.layers[1].feed_forward.shared_expert.down_proj = torch.nn.Identity()
    before = snapshot(model)
    with pytest.raises(ValueError, match="shared_expert"):
        plan_expert_channels(model, _config(0.5))
    assert_state_unchanged(model, before)


def test_bad_input_is_refused_before_any_change():
    dense = make_model("llama")
    before = snapshot(dense)
    with pytest.raises(ValueError, match="not a mixture of experts"):
        SparsePruner(_config(0.5)).apply(dense, dataset=make_ids(), progress=False)
    assert_state_unchanged(dense, before)
    model = make_moe("qwen3_moe")
    before = snapshot(model)
    with pytest.raises(ValueError, match="nothing would be removed"):
        plan_expert_channels(model, _config(0.01))
    with pytest.raises(ValueError, match="nothing would be removed"):
        SparsePruner(_config(0.01)).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)
    with pytest.raises(ValueError, match="criterion"):
        _config(0.5, method_kwargs={"criterion": "hessian"})
    with pytest.raises(ValueError, match="structure must be 'expert-channels'"):
        PruningConfig(method="expert-channels", structure="channels", sparsity=0.5)
    with pytest.raises(ValueError, match="structure must be one of"):
        PruningConfig(method="wanda-structured", structure="expert-channels", sparsity=0.5)
    with pytest.raises(ValueError, match="uniform"):
        _config(0.5, allocation="search")


def test_multiple_of_rounds_the_kept_width():
    model = make_moe("mixtral")  # 64 channels per expert
    plan = plan_expert_channels(model, _config(0.3, multiple_of=16))  # 64 - 19 = 45 -> 48
    assert plan.keep == 48 and plan.width_field == "intermediate_size"
