"""Whole-expert removal (`structure="experts"`, method `"expert-removal"`) on tiny random MoE models."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.structured.experts import collect_expert_stats, plan_expert_removal

from .helpers import assert_state_unchanged, make_ids, make_model, snapshot

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _moe_config(model_type: str):
    shared = dict(moe_intermediate_size=32, shared_expert_intermediate_size=32)
    builders = {
        "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **_COMMON),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                         head_dim=8, **_COMMON),
        "olmoe": lambda: transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **_COMMON),
        # group-limited routing, a dense first block and a shared expert
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, **shared, **_COMMON),
        "granitemoe": lambda: transformers.GraniteMoeConfig(num_local_experts=4, num_experts_per_tok=2, **_COMMON),
        "phimoe": lambda: transformers.PhimoeConfig(num_local_experts=4, num_experts_per_tok=2, **_COMMON),
        "gpt_oss": lambda: transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=8, **_COMMON),
        "qwen3_next": lambda: transformers.Qwen3NextConfig(
            num_experts=4, num_experts_per_tok=2, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8, **shared, **_COMMON),
        # input-scaled experts, a shared expert and a dense first block (interleave step 2)
        "llama4_text": lambda: transformers.Llama4TextConfig(
            num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=64, head_dim=8,
            interleave_moe_layer_step=2, no_rope_layers=[1, 1], **_COMMON),
    }
    return builders[model_type]()


MOE_TYPES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe", "granitemoe", "phimoe", "gpt_oss",
             "qwen3_next", "llama4_text"]
COUNT_FIELD = {"mixtral": "num_local_experts", "granitemoe": "num_local_experts", "phimoe": "num_local_experts",
               "gpt_oss": "num_local_experts", "deepseek_v3": "n_routed_experts", "llama4_text": "num_local_experts"}


def make_moe(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_moe_config(model_type)).eval()


def _config(sparsity=0.5, **kwargs):
    return PruningConfig(method="expert-removal", structure="experts", sparsity=sparsity, num_samples=8, seq_len=16,
                         batch_size=4, **kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_remove_half_the_experts_saves_and_reloads_with_stock_transformers(model_type, tmp_path):
    model = make_moe(model_type)
    ids = make_ids()
    before = snapshot(model)
    plan = plan_expert_removal(model, _config())
    num_experts, field = plan.num_experts, COUNT_FIELD.get(model_type, "num_experts")
    pruner = SparsePruner(_config())
    pruner.apply(model, dataset=ids, progress=False)
    kept = num_experts // 2
    assert getattr(model.config, field) == kept
    for layer, block in zip(plan.layers, pruner.report.blocks):
        keep = torch.tensor(block["kept_experts"])
        assert len(keep) == kept and sorted(block["removed_experts"] + block["kept_experts"]) == list(range(num_experts))
        for name, tensor in list(layer.experts.named_parameters()) + list(layer.router.named_parameters()):
            full = f"{layer.name}.{name}" if any(p is tensor for p in layer.experts.parameters()) else \
                f"{layer.router_name}.{name}"
            original = before[full]
            if original.shape[0] == num_experts:  # sliced and renumbered: new expert i is old expert keep[i]
                torch.testing.assert_close(tensor.detach(), original[keep], rtol=0, atol=0)
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()
    pruner.save_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # stock class, no trust_remote_code
    assert type(reloaded) is type(model)
    assert getattr(reloaded.config, field) == kept
    reloaded_experts = [m for m in reloaded.modules() if m is not reloaded and hasattr(m, "gate_up_proj")]
    assert reloaded_experts and all(m.gate_up_proj.shape[0] == kept for m in reloaded_experts)
    torch.testing.assert_close(_logits(reloaded, ids), logits, rtol=0, atol=0)
    with open(os.path.join(tmp_path, "pruning_report.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert [b["removed_experts"] for b in saved["blocks"]] == [b["removed_experts"] for b in pruner.report.blocks]
    card = open(os.path.join(tmp_path, "README.md"), encoding="utf-8").read()
    assert f"{num_experts - kept} of {num_experts} experts" in card


def test_deepseek_removes_equally_from_every_group():
    model = make_moe("deepseek_v3")
    pruner = SparsePruner(_config(0.5))
    pruner.apply(model, dataset=make_ids(), progress=False)
    (block,) = pruner.report.blocks  # block 0 is dense
    assert pruner.structured_summary["dense_blocks"] == [0]
    assert sum(e < 4 for e in block["removed_experts"]) == 2 and sum(e >= 4 for e in block["removed_experts"]) == 2
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.shape == (4,)


def _mixtral_reference(model, ids):
    """Per-expert tokens, mass and contribution of block 0, routing the tokens by hand."""
    captured = []
    layer = model.model.layers[0]
    handle = layer.mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 32)))
    _logits(model, ids)
    handle.remove()
    x = torch.cat(captured)
    probs = F.softmax(x @ layer.mlp.gate.weight.t(), dim=-1)
    top, index = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    experts = layer.mlp.experts
    tokens, mass, contribution = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    for e in range(4):
        w = (top * (index == e)).sum(-1)
        gate, up = (x @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ experts.down_proj[e].t()
        tokens[e] = (index == e).sum()
        mass[e] = w.sum()
        contribution[e] = (w[:, None] * out).norm(dim=-1).sum()
    return tokens, mass, contribution


def test_expert_statistics_equal_hand_routing():
    model = make_moe("mixtral")
    ids = make_ids()
    stats = collect_expert_stats(model, plan_expert_removal(model, _config()), ids, batch_size=3, progress=False)[0]
    tokens, mass, contribution = _mixtral_reference(model, ids)
    torch.testing.assert_close(stats.tokens.float(), tokens)
    torch.testing.assert_close(stats.mass.float(), mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.contribution.float(), contribution, rtol=1e-4, atol=1e-5)


def _llama4_reference(model, ids):
    """Per-expert tokens, mass and contribution of Llama-4's MoE block (block 1), routing by hand: sigmoid of the top-1
    router logit scales the expert's input."""
    captured = []
    moe = model.model.layers[1].feed_forward
    handle = moe.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 32)))
    _logits(model, ids)
    handle.remove()
    x = torch.cat(captured)
    top, index = (x @ moe.router.weight.t()).topk(1, dim=-1)
    scale = torch.sigmoid(top[:, 0])
    experts = moe.experts
    tokens, mass, contribution = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    for e in range(4):
        rows = index[:, 0] == e
        xs = scale[rows, None] * x[rows]
        gate, up = (xs @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ experts.down_proj[e]
        tokens[e], mass[e], contribution[e] = rows.sum(), scale[rows].sum(), out.norm(dim=-1).sum()
    return tokens, mass, contribution


def test_llama4_expert_statistics_equal_hand_routing():
    model = make_moe("llama4_text")
    ids = make_ids()
    plan = plan_expert_removal(model, _config())
    assert [layer.index for layer in plan.layers] == [1] and plan.skipped_blocks == [0]
    assert plan.layers[0].router_name == "model.layers.1.feed_forward.router"
    stats = collect_expert_stats(model, plan, ids, batch_size=3, progress=False)[0]
    tokens, mass, contribution = _llama4_reference(model, ids)
    assert stats.tokens.sum() == ids.numel()  # top-1: one slot per token
    torch.testing.assert_close(stats.tokens.float(), tokens)
    torch.testing.assert_close(stats.mass.float(), mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.contribution.float(), contribution, rtol=1e-4, atol=1e-5)


def test_llama4_removal_keeps_the_shared_expert_and_matches_brute_force_reconstruction():
    model = make_moe("llama4_text")
    ids = make_ids()
    moe = model.model.layers[1].feed_forward
    shared = {n: p.detach().clone() for n, p in moe.shared_expert.named_parameters()}
    errors, _ = _brute_force_errors(model, ids, "model.layers.1.feed_forward", "router")
    pruner = SparsePruner(_config(0.25, method_kwargs={"criterion": "reconstruction"}))
    pruner.apply(model, dataset=ids, progress=False)
    (block,) = pruner.report.blocks
    assert block["removed_experts"] == [min(range(4), key=lambda e: errors[e])]
    assert block["reconstruction_path"][0][1] == pytest.approx(min(errors), rel=1e-4)
    assert model.config.num_local_experts == 3 and moe.router.out_features == 3 and moe.experts.num_experts == 3
    for n, p in moe.shared_expert.named_parameters():
        assert torch.equal(p, shared[n])


@pytest.mark.parametrize("criterion", ["contribution", "mass", "frequency", "reconstruction"])
def test_an_expert_never_routed_is_removed_and_outputs_do_not_change(criterion):
    model = make_moe("gpt_oss")  # its router has a bias: expert 2 can never be in a token's top-2
    ids = make_ids()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[2] = -1e4
    dense = _logits(model, ids)
    pruner = SparsePruner(_config(0.25, method_kwargs={"criterion": criterion}))
    pruner.apply(model, dataset=ids, progress=False)
    for block in pruner.report.blocks:
        assert block["tokens"][2] == 0 and block["removed_experts"] == [2]
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type, kwargs, match", [
    ("mixtral", dict(sparsity=0.75), "num_experts_per_tok"),
    ("mixtral", dict(sparsity=0.1), "removes none"),
    ("deepseek_v3", dict(sparsity=0.125), "groups"),
    ("deepseek_v3", dict(sparsity=0.5, method_kwargs={"criterion": "reconstruction"}), "one at a time"),
])
def test_refused_before_any_change(model_type, kwargs, match):
    model = make_moe(model_type)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        SparsePruner(_config(**kwargs)).apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


def test_dense_model_is_refused():
    model = make_model("llama")
    with pytest.raises(ValueError, match="not a mixture of experts"):
        SparsePruner(_config()).apply(model, dataset=make_ids(), progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="flap", structure="experts"), "'channels', 'heads'"),
    (dict(method="expert-removal", structure="channels"), "must be 'experts'"),
    (dict(method="sparsegpt", structure="experts"), "structured method"),
    (dict(method="expert-removal", structure="experts", method_kwargs={"criterion": "random"}), "criterion"),
    (dict(method="expert-removal", structure="experts", allocation="owl"), "uniform"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_cli_removes_experts(tmp_path, tokenizer, capsys):
    from optimum_sparse.cli.main import main

    from .helpers import SENTENCES

    make_moe("qwen3_moe").save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(SENTENCES * 20))
    code = main(["prune", "--model", str(tmp_path / "dense"), "--method", "expert-removal", "--structure", "experts",
                 "--sparsity", "0.5", "--method-kwargs", '{"criterion": "mass"}', "--num-samples", "4",
                 "--seq-len", "16", "--dataset", str(text), "--output", str(tmp_path / "out")])
    assert code == 0
    assert "of the prunable parameters" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.num_experts == 2
    assert loaded.model.layers[1].mlp.gate.weight.shape == (2, 32)


def _brute_force_errors(model, ids, moe_name: str, router: str) -> tuple[list, torch.Tensor]:
    """`([relative output error of the MoE module with expert e dropped (its router row with it), e = 0..3], logits)`:
    each on a pruned copy of the stock module, on the module's own calibration inputs."""
    moe = model.get_submodule(moe_name)
    captured = []
    handle = moe.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    logits = _logits(model, ids)
    handle.remove()
    x = torch.cat(captured)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731  (Llama-4 also returns router logits)
    with torch.no_grad():
        full = first(moe(x))
    errors = []
    for e in range(4):
        pruned = AutoModelForCausalLM.from_config(model.config)
        pruned.load_state_dict(model.state_dict())
        keep = [k for k in range(4) if k != e]
        m = pruned.get_submodule(moe_name)
        r = getattr(m, router)
        with torch.no_grad():
            m.experts.gate_up_proj = torch.nn.Parameter(m.experts.gate_up_proj[keep])
            m.experts.down_proj = torch.nn.Parameter(m.experts.down_proj[keep])
            r.weight = torch.nn.Parameter(r.weight[keep])
            m.experts.num_experts = r.num_experts = 3
            errors.append(float((first(m(x)) - full).pow(2).sum() / full.pow(2).sum()))
    return errors, logits


def test_reconstruction_removes_the_expert_whose_loss_changes_the_block_output_least():
    model = make_moe("mixtral")
    ids = make_ids()
    errors, dense = _brute_force_errors(model, ids, "model.layers.0.mlp", "gate")
    pruner = SparsePruner(_config(0.25, method_kwargs={"criterion": "reconstruction"}))
    pruner.apply(model, dataset=ids, progress=False)
    block = pruner.report.blocks[0]
    best = min(range(4), key=lambda e: errors[e])
    assert block["removed_experts"] == [best]
    assert block["reconstruction_path"][0][0] == best
    assert block["reconstruction_path"][0][1] == pytest.approx(errors[best], rel=1e-4)
    torch.testing.assert_close(torch.tensor(block["scores"], dtype=torch.float64), -torch.tensor(errors, dtype=torch.float64),
                               rtol=1e-4, atol=1e-9)
    assert not torch.equal(_logits(model, ids), dense)
