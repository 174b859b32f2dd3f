"""Pruning mixture-of-experts models end to end: every expert pruned exactly, the report measured on the weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.engine import UnsupportedModelError
from optimum_sparse.engine.experts import find_experts_modules
from optimum_sparse.methods.masks import num_pruned

from ..helpers import assert_state_unchanged, make_ids, snapshot
from .helpers import MOE_TYPES, NUM_EXPERTS, block_params, make_moe


def _prune(model, method="sparsegpt", sparsity=0.5, **kwargs):
    config = PruningConfig(method=method, sparsity=sparsity, num_samples=8, seq_len=16, batch_size=2, **kwargs)
    pruner = SparsePruner(config)
    pruner.apply(model, dataset=make_ids(), progress=False)
    return pruner


def _expert_slices(model):
    """`{full name: [out, in] weight}` for every expert projection of the model."""
    out = {}
    for i, block in enumerate(model.model.layers):
        for name, (module, layout) in find_experts_modules(block).items():
            for projection in layout.projections:
                param = getattr(module, projection)
                for e in range(param.shape[0]):
                    w = param[e].t() if layout.transposed else param[e]
                    out[f"model.layers.{i}.{name}.{e}.{projection}"] = w.detach()
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_every_expert_pruned_exactly_and_the_report_measures_it(model_type, method):
    model = make_moe(model_type)
    pruner = _prune(model, method)
    report = pruner.report
    experts = _expert_slices(model)
    assert len(experts) >= 2 * NUM_EXPERTS
    layers = {r.name: r for r in report.layers}
    for name, weight in experts.items():
        assert int((weight == 0).sum()) == num_pruned(weight.numel(), 0.5), name
        assert layers[name].extra["measured_sparsity"] == pytest.approx(0.5)
        if method != "magnitude":
            assert layers[name].extra["routed_tokens"] >= 0
    # the report's sparsity is counted on the weights of every target matrix
    zeros = total = 0
    for r in report.layers:
        weight = experts.get(r.name)
        if weight is None:
            weight = model.get_submodule(r.name).weight
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    assert report.mean_sparsity == pytest.approx(zeros / total, abs=1e-12)
    assert report.inventory["target_params"] == total
    assert report.inventory["pruned_share"] == pytest.approx(total / sum(p.numel() for p in model.parameters()))
    assert torch.isfinite(model(make_ids(2)).logits).all()


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_nm_is_exact_inside_every_expert(model_type):
    model = make_moe(model_type)
    _prune(model, "sparsegpt", structure="2:4")
    for name, weight in _expert_slices(model).items():
        groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert torch.all(groups == 2), name
    assert torch.isfinite(model(make_ids(2)).logits).all()


def test_wanda_4_8_and_true_sequential_on_experts():
    model = make_moe("qwen2_moe")
    _prune(model, "wanda", structure="4:8", true_sequential=True)
    for name, weight in _expert_slices(model).items():
        assert torch.all((weight == 0).reshape(weight.shape[0], -1, 8).sum(-1) == 4), name
    assert torch.equal(model.model.layers[0].mlp.shared_expert.down_proj.weight.eq(0).reshape(32, -1, 8).sum(-1),
                       torch.full((32, 4), 4))


def test_true_sequential_collects_down_statistics_after_the_pruned_up_projections():
    model = make_moe("mixtral")
    pruner = _prune(model, "sparsegpt", true_sequential=True)
    names = [r.name for r in pruner.report.layers if r.name.startswith("model.layers.0.")]
    first_down = min(i for i, n in enumerate(names) if n.endswith("down_proj"))
    last_up = max(i for i, n in enumerate(names) if n.endswith("gate_up_proj"))
    assert names[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert last_up < first_down


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "llama4_text", "deepseek_v3", "mixtral"])
def test_save_and_reload_gives_identical_outputs(model_type, tmp_path):
    from optimum_sparse.serialization import load_pruning_record

    model = make_moe(model_type)
    pruner = _prune(model, "sparsegpt")
    pruner.save_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = make_ids(2)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    saved = json.loads((tmp_path / "pruning_report.json").read_text())
    assert saved["mean_sparsity"] == pytest.approx(pruner.report.mean_sparsity)
    assert saved["inventory"]["skipped_reasons"]["router"] >= 1
    card = (tmp_path / "README.md").read_text()
    assert "Pruned share of the model's parameters" in card and "router" in card
    record = load_pruning_record(tmp_path)  # Mixtral is saved as legacy w1/w2/w3 per expert: recovered too
    for name, weight in _expert_slices(model).items():
        mask = record.masks[name]
        assert mask.float().mean() == pytest.approx(0.5)


def test_report_lists_every_skipped_parameter_with_its_reason():
    model = make_moe("qwen2_moe")
    pruner = _prune(model, "wanda")
    inventory = pruner.report.inventory
    skipped = {e["name"]: e["reason"] for e in inventory["skipped"]}
    for i in range(2):
        assert skipped[f"model.layers.{i}.mlp.gate.weight"] == "router"
        assert skipped[f"model.layers.{i}.mlp.shared_expert_gate.weight"] == "router"
        assert skipped[f"model.layers.{i}.self_attn.q_proj.bias"] == "bias"
        assert skipped[f"model.layers.{i}.input_layernorm.weight"] == "norm"
    # every block parameter is either pruned or listed as skipped
    pruned_params = {n for n, p in block_params(model).items() if n not in skipped}
    assert all(".experts." in n or n.endswith("_proj.weight") for n in pruned_params)
    assert model.model.layers[0].mlp.shared_expert_gate.weight.eq(0).sum() == 0  # routers are never pruned by class
    assert inventory["skipped_params"] == sum(block_params(model)[n].numel() for n in skipped)


def test_a_router_is_pruned_when_targets_name_it():
    model = make_moe("qwen2_moe")
    pruner = _prune(model, "magnitude", targets=["Linear", "shared_expert_gate"])
    assert "model.layers.0.mlp.shared_expert_gate" in {r.name for r in pruner.report.layers}
    assert int(model.model.layers[0].mlp.shared_expert_gate.weight.eq(0).sum()) == 16


def test_ignored_experts_are_listed_and_untouched():
    model = make_moe("mixtral")
    before = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    pruner = _prune(model, "sparsegpt", ignore=[r"re:\.experts\."])
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, before)
    skipped = {e["name"]: e["reason"] for e in pruner.report.inventory["skipped"]}
    assert skipped["model.layers.0.mlp.experts.down_proj"] == "ignore"
    assert pruner.report.inventory["pruned_share"] < 0.1  # attention only: the report says so
    assert pruner.report.mean_sparsity == pytest.approx(0.5)


def test_an_uncovered_weight_matrix_raises_before_any_change():
    model = make_moe("qwen3_moe")
    model.model.layers[1].mlp.register_parameter("mystery", nn.Parameter(torch.randn(4, 32)))
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.mystery"):
        _prune(model, "sparsegpt")
    assert_state_unchanged(model, before)


def test_dense_models_report_the_same_sparsity_as_before(model_factory):
    model = model_factory("llama")
    pruner = _prune(model, "sparsegpt")
    by_layers = sum(torch.Size(r.shape).numel() * r.sparsity for r in pruner.report.layers) / sum(
        torch.Size(r.shape).numel() for r in pruner.report.layers)
    assert pruner.report.mean_sparsity == pytest.approx(by_layers)
    assert pruner.report.inventory["skipped_reasons"] == {"norm": 4}


def test_allocation_sees_every_expert_as_a_layer():
    from optimum_sparse.allocation import target_modules

    model = make_moe("qwen3_moe")
    names = {m.name for m in target_modules(model, PruningConfig())}
    assert "model.layers.1.mlp.experts.3.down_proj" in names
    override = {"model.layers.0.mlp.experts.1.down_proj": 0.75}
    pruner = _prune(model, "sparsegpt", allocation="owl", layer_sparsity=override)
    weight = model.model.layers[0].mlp.experts.down_proj[1]
    assert int((weight == 0).sum()) == num_pruned(weight.numel(), 0.75)
    sparsity = pruner.allocation.to_dict()
    assert any(".experts." in name for name in json.dumps(sparsity).split('"'))
    total = sum(torch.Size(r.shape).numel() for r in pruner.report.layers)
    zeros = sum(torch.Size(r.shape).numel() * r.extra["measured_sparsity"] for r in pruner.report.layers)
    assert zeros == pytest.approx(num_pruned(total, 0.5), abs=0.5)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe", "llama4_text", "mixtral"])
def test_sparsellm_solves_every_expert_and_shared_expert_jointly(model_type):
    model = make_moe(model_type)  # DeepSeek/Llama-4: a dense first block; Qwen2/DeepSeek/Llama-4: shared experts
    pruner = _prune(model, "sparsellm", min_expert_tokens=1)
    experts = [r for r in pruner.report.layers if ".experts." in r.name]
    assert experts and all(r.extra["solver"] == "sparsellm" for r in experts)
    for r in experts:  # the joint solve keeps its best iterate: never worse than its SparseGPT start
        assert r.extra["ffn_error"] <= r.extra["ffn_error_sparsegpt"] + 1e-12
    for name, weight in _expert_slices(model).items():
        assert int((weight == 0).sum()) == num_pruned(weight.numel(), 0.5), name
    assert pruner.report.mean_sparsity == pytest.approx(0.5, abs=1e-3)
    assert torch.isfinite(model(make_ids(2)).logits).all()


def test_sparsellm_joint_solve_lowers_the_routed_expert_error():
    model = make_moe("mixtral")
    pruner = _prune(model, "sparsellm", min_expert_tokens=1, method_kwargs={"iterations": 2})
    errors = [(r.extra["ffn_error"], r.extra["ffn_error_sparsegpt"]) for r in pruner.report.layers
              if r.name.endswith("down_proj") and ".experts." in r.name]
    assert sum(e for e, _ in errors) < sum(s for _, s in errors)


def test_sparsellm_names_the_experts_it_prunes_with_sparsegpt():
    model = make_moe("gpt_oss")  # its clamped gate is not φ(gate)·up; the starved expert has no token
    _starve_last_expert(model)
    pruner = _prune(model, "sparsellm", min_expert_tokens=1)
    solvers = {r.name: r.extra.get("solver", "") for r in pruner.report.layers if ".experts." in r.name}
    assert all(s.startswith("sparsegpt (the experts' gate") for s in solvers.values())
    mixtral = make_moe("mixtral")
    with torch.no_grad():  # Mixtral: a router hook sends nothing to the last expert
        for block in mixtral.model.layers:
            block.mlp.gate.register_forward_hook(_never_last)
    pruner = _prune(mixtral, "sparsellm", min_expert_tokens=1)
    layers = {r.name: r for r in pruner.report.layers}
    starved = layers["model.layers.0.mlp.experts.3.down_proj"]
    assert starved.extra["solver"].startswith("sparsegpt (under-calibrated") and starved.extra["routed_tokens"] == 0
    assert starved.extra["fallback"] == "mean-hessian"
    assert layers["model.layers.0.mlp.experts.0.down_proj"].extra["solver"] == "sparsellm"
    weight = mixtral.model.layers[0].mlp.experts.down_proj[3]
    assert int((weight == 0).sum()) == weight.numel() // 2


def _starve_last_expert(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.bias"):
                p[-1] = -1e4


def _never_last(module, args, output):
    """Mixtral router hook: the last expert's choices go to expert 0 (its weight kept), so it gets no token."""
    logits, scores, index = output
    index = index.clone()
    first, second = index[:, 0], index[:, 1]
    last = module.num_experts - 1
    index[:, 0] = torch.where(first == last, torch.where(second == 0, 1, 0), first)
    index[:, 1] = torch.where(second == last, torch.where(index[:, 0] == 0, 1, 0), second)
    return logits, scores, index


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_elsa_trains_through_the_experts(model_type, structure):
    from ..methods.test_elsa import FAST

    model = make_moe(model_type)
    before = _expert_slices(model)
    before = {n: w.clone() for n, w in before.items()}
    overrides = {"layer_sparsity": {"model.layers.1.mlp.experts.2.down_proj": 0.75}} if structure == "2:4" else {}
    pruner = _prune(model, "elsa", structure=structure, method_kwargs=FAST, **overrides)
    after = _expert_slices(model)
    layers = {r.name: r for r in pruner.report.layers}
    for name, weight in after.items():
        kept = weight != 0
        assert not torch.equal(weight[kept], before[name][kept]), f"{name}: not trained"
        zeros = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        if structure == "2:4":
            assert torch.all(zeros == (3 if name.endswith("1.mlp.experts.2.down_proj") else 2)), name
        else:
            assert int((weight == 0).sum()) == num_pruned(weight.numel(), 0.5), name
        assert layers[name].extra["measured_sparsity"] == pytest.approx(layers[name].sparsity)
    assert torch.isfinite(model(make_ids(2)).logits).all()


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_alps_prunes_every_expert_exactly(model_type, structure):
    model = make_moe(model_type)
    _prune(model, "alps", structure=structure)
    for name, weight in _expert_slices(model).items():
        if structure == "2:4":
            assert torch.all((weight == 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2), name
        else:
            assert int((weight == 0).sum()) == num_pruned(weight.numel(), 0.5), name
    assert torch.isfinite(model(make_ids(2)).logits).all()


def test_search_allocation_over_expert_matrices():
    model = make_moe("mixtral")
    small = {"generations": 2, "offspring": 2, "survivors": 1, "rounds": 1, "levels": 1, "kl_topk": 16}
    pruner = _prune(model, "wanda", sparsity=0.6, allocation="search", allocation_kwargs=small)
    allocated = pruner.allocation.to_dict()
    names = [r.name for r in pruner.report.layers]
    assert any(".experts." in n for n in names)
    total = sum(torch.Size(r.shape).numel() for r in pruner.report.layers)
    zeros = sum(round(torch.Size(r.shape).numel() * r.extra["measured_sparsity"]) for r in pruner.report.layers)
    assert zeros == num_pruned(total, 0.6)  # the allocation's budget, exact over attention and experts together
    assert any(".experts." in name for name in json.dumps(allocated).split('"'))


def test_bfloat16_experts_keep_their_dtype_and_exact_sparsity():
    model = make_moe("qwen3_moe").to(torch.bfloat16)
    pruner = _prune(model, "sparsegpt")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name, weight in _expert_slices(model).items():
        assert int((weight == 0).sum()) == num_pruned(weight.numel(), 0.5), name
    assert pruner.report.mean_sparsity == pytest.approx(0.5)
    assert torch.isfinite(model(make_ids(2)).logits.float()).all()


def test_non_finite_routed_inputs_raise_before_an_expert_is_written():
    model = make_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    before = {n: p.detach().clone() for n, p in experts.named_parameters()}

    def overflow(module, args):  # what a float16 overflow upstream of the experts looks like
        return (args[0].clone().fill_(float("inf")),) + tuple(args[1:])

    model.model.layers[0].mlp.experts.register_forward_pre_hook(overflow)
    from optimum_sparse import NonFiniteActivationError

    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.0\.mlp\.experts"):
        _prune(model, "sparsegpt", ignore=["self_attn"])
    for name, param in experts.named_parameters():
        assert torch.equal(param, before[name]), name
