"""Fused experts as prunable matrices: layouts, the experts' own forward, per-expert statistics and the fallback."""

from __future__ import annotations

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.engine import find_blocks, get_architecture
from optimum_sparse.engine.experts import (
    ExpertLinear, expert_handles, expert_intermediate, expert_output, find_experts_modules,
)
from optimum_sparse.methods.base import PruningMethod, register_method

from ..helpers import make_ids
from .helpers import EXPECTED_LAYOUT, MOE_TYPES, NUM_EXPERTS, make_moe


@register_method
class RecordStats(PruningMethod):
    """Test method: records the statistics the engine hands to each target and changes nothing."""

    name = "test-record-expert-stats"
    stats = "hessian"
    seen: dict = {}

    def prune_layer(self, name, weight, stats, sparsity):
        type(self).seen[name] = stats
        return weight, torch.zeros_like(weight, dtype=torch.bool)


def _moe_blocks(model):
    spec = get_architecture(model)
    for i, block in enumerate(find_blocks(model, spec)):
        experts = find_experts_modules(block)
        if experts:
            yield f"{spec.blocks}.{i}", block, experts


def _capture_expert_calls(model, ids):
    """`{experts module name: [(args, output)]}` from a dense forward of the whole model."""
    calls, hooks = {}, []
    for prefix, _, experts in _moe_blocks(model):
        for name, (module, _) in experts.items():
            key = f"{prefix}.{name}"
            calls[key] = []

            def hook(mod, args, kwargs, output, key=key):
                calls[key].append((tuple(a.detach() for a in list(args) + list(kwargs.values())), output.detach()))

            hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for start in range(0, len(ids), 2):  # the engine's batches (batch_size=2)
            model(ids[start:start + 2])
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_layout_and_handles(model_type):
    model = make_moe(model_type)
    found = list(_moe_blocks(model))
    assert found, f"{model_type}: no fused experts found"
    for _, block, experts in found:
        ((name, (module, layout)),) = experts.items()
        assert layout.name == EXPECTED_LAYOUT.get(model_type, "concatenated")
        handles = expert_handles(block)
        assert len(handles) == 2 * NUM_EXPERTS
        up, down = handles[f"{name}.0.{layout.up_name}"], handles[f"{name}.3.down_proj"]
        hidden = model.config.hidden_size
        assert up.weight.shape[1] == hidden and down.weight.shape[0] == hidden
        assert up.weight.shape[0] == 2 * down.weight.shape[1]  # [gate; up] rows, down's inputs
        # the handle is a view: writing through it changes the fused parameter
        new = torch.randn_like(down.weight, dtype=torch.float32)
        new[0, :3] = 0.0
        down.write(new)
        stored = module.down_proj[3].t() if layout.transposed else module.down_proj[3]
        assert torch.equal(stored, new.to(stored.dtype))


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_expert_output_equals_the_models_own_experts_forward(model_type):
    model = make_moe(model_type)
    calls = _capture_expert_calls(model, make_ids(4))
    for prefix, _, experts in _moe_blocks(model):
        ((name, (module, layout)),) = experts.items()
        for args, output in calls[f"{prefix}.{name}"]:
            if layout.input_scaled:  # Llama-4: [E·T, d] inputs already scaled, every expert on its own rows
                x = args[0].reshape(NUM_EXPERTS, -1, args[0].shape[-1])
                expected = torch.cat([expert_output(module, layout, e, x[e]) for e in range(NUM_EXPERTS)])
            else:
                hidden, index, weights = args[0], args[1], args[2]
                expected = torch.zeros(hidden.shape, dtype=torch.float32)
                for e in range(NUM_EXPERTS):
                    token, slot = (index == e).nonzero(as_tuple=True)
                    expected.index_add_(0, token, expert_output(module, layout, e, hidden[token]) * weights[token, slot, None])
            torch.testing.assert_close(output.float(), expected, atol=1e-5, rtol=1e-4)


def _record(model, **config):
    RecordStats.seen = {}
    cfg = PruningConfig(method=RecordStats.name, sparsity=0.5, num_samples=8, seq_len=16, batch_size=2, **config)
    SparsePruner(cfg).apply(model, dataset=make_ids(), progress=False)
    return dict(RecordStats.seen)


@torch.no_grad()
def _reference(model_type, pooled=False):
    """Per-expert `Σ w² x xᵀ` (up) and `Σ w² h hᵀ` (down) computed from the experts' calls by hand, in float64;
    `pooled`: every input token of the MoE module, unweighted."""
    model = make_moe(model_type)
    moe_inputs, hooks = {}, []
    for prefix, block, experts in _moe_blocks(model):
        parent = block.get_submodule(next(iter(experts)).rpartition(".")[0])

        def grab(module, args, prefix=prefix):
            moe_inputs.setdefault(prefix, []).append(args[0].reshape(-1, args[0].shape[-1]))

        hooks.append(parent.register_forward_pre_hook(grab))
    calls = _capture_expert_calls(model, make_ids())
    for h in hooks:
        h.remove()
    ref = {}
    for prefix, _, experts in _moe_blocks(model):
        ((name, (module, layout)),) = experts.items()
        for e in range(NUM_EXPERTS):
            up = down = 0.0
            count = 0
            for j, (args, _) in enumerate(calls[f"{prefix}.{name}"]):
                if pooled:  # the MoE module's own input (Llama-4's experts only see it pre-scaled)
                    x, w = moe_inputs[prefix][j], 1.0
                elif layout.input_scaled:
                    rows = args[0].reshape(NUM_EXPERTS, -1, args[0].shape[-1])[e]
                    x, w = rows[rows.ne(0).any(-1)], 1.0
                else:
                    token, slot = (args[1] == e).nonzero(as_tuple=True)
                    x, w = args[0][token], args[2][token, slot].unsqueeze(-1)
                count += len(x)
                wx = (x * w).double()
                h = (expert_intermediate(module, layout, e, x) * w).double()
                up = up + wx.t() @ wx
                down = down + h.t() @ h
            ref[f"{prefix}.{name}.{e}.{layout.up_name}"] = (up, count)
            ref[f"{prefix}.{name}.{e}.down_proj"] = (down, count)
    return ref


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_routed_statistics_equal_a_reference_by_hand(model_type):
    seen = _record(make_moe(model_type), min_expert_tokens=1)
    reference = _reference(model_type)
    assert set(reference) <= set(seen)
    for name, (hessian, count) in reference.items():
        stats = seen[name]
        assert stats.routed_tokens == count, name
        if count == 0:
            continue
        assert stats.fallback is None
        torch.testing.assert_close(stats.hessian.double(), hessian, rtol=1e-4, atol=1e-5 * float(hessian.abs().max()),
                                   msg=name)


def test_mixtral_routing_read_from_the_router_equals_routing_by_hand():
    model = make_moe("mixtral")
    calls = _capture_expert_calls(model, make_ids(2))
    block = model.model.layers[0]
    captured = {}
    def grab(module, args):
        captured.setdefault("x", args[0].reshape(-1, args[0].shape[-1]))

    block.mlp.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(make_ids(2))
    probs = torch.softmax(captured["x"] @ block.mlp.gate.weight.t(), dim=-1)
    top, index = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    args, _ = calls["model.layers.0.mlp.experts"][0]
    assert torch.equal(args[1], index)
    torch.testing.assert_close(args[2], top)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_pooled_statistics_use_every_token_unweighted(model_type):
    seen = _record(make_moe(model_type), expert_statistics="pooled")
    reference = _reference(model_type, pooled=True)
    ups = [n for n in reference if not n.endswith("down_proj")]
    for name, (hessian, _) in reference.items():
        torch.testing.assert_close(seen[name].hessian.double(), hessian, rtol=1e-4,
                                   atol=1e-5 * float(hessian.abs().max()), msg=name)
    blocks = {n.rsplit(".", 2)[0] for n in ups}
    for head in blocks:  # one shared accumulation for the up projections of a module
        shared = {id(seen[n]) for n in ups if n.startswith(head + ".")}
        assert len(shared) == 1


def _starve_last_expert(model):
    """Routes no token to the last expert of every MoE block (gpt-oss: a large negative router bias)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.bias"):
                p[-1] = -1e4


@pytest.mark.parametrize("fallback", ["mean-hessian", "damping", "magnitude"])
def test_zero_token_expert_gets_the_fallback(fallback):
    model = make_moe("gpt_oss")
    _starve_last_expert(model)
    seen = _record(model, min_expert_tokens=1, expert_fallback=fallback)
    up = "model.layers.0.mlp.experts.{}.gate_up_proj"
    others = [seen[up.format(e)] for e in range(NUM_EXPERTS - 1)]
    assert all(o.fallback is None and o.routed_tokens > 0 for o in others)
    if fallback == "magnitude":  # the engine pruned it by magnitude: the method never saw it
        assert up.format(NUM_EXPERTS - 1) not in seen
    else:
        starved = seen[up.format(NUM_EXPERTS - 1)]
        assert starved.routed_tokens == 0 and starved.fallback == fallback
        assert torch.isfinite(starved.hessian).all()
    mean = torch.stack([o.hessian.double() / o.routed_tokens for o in others]).mean(0)
    if fallback == "mean-hessian":
        torch.testing.assert_close(starved.hessian.double(), mean, rtol=1e-5, atol=1e-7)
        # the mean covers the module's other experts even when only the starved one is pruned
        alone = make_moe("gpt_oss")
        _starve_last_expert(alone)
        only = _record(alone, min_expert_tokens=1, targets=[rf"re:experts\.{NUM_EXPERTS - 1}\."])
        assert set(only) == {f"model.layers.{i}.mlp.experts.{NUM_EXPERTS - 1}.{p}" for i in range(2)
                             for p in ("gate_up_proj", "down_proj")}
        torch.testing.assert_close(only[up.format(NUM_EXPERTS - 1)].hessian.double(), mean, rtol=1e-5, atol=1e-7)
    elif fallback == "damping":  # a scaled identity: no token, all deficit
        level = float(torch.diagonal(mean).mean())
        torch.testing.assert_close(starved.hessian.double(), level * torch.eye(len(mean), dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)

    # and the real run: exact sparsity, finite outputs, the fallback and token count in the report
    pruned = make_moe("gpt_oss")
    _starve_last_expert(pruned)
    pruner = SparsePruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=16, batch_size=2,
                                        min_expert_tokens=1, expert_fallback=fallback))
    pruner.apply(pruned, dataset=make_ids(), progress=False)
    layer = next(r for r in pruner.report.layers if r.name == up.format(NUM_EXPERTS - 1))
    assert layer.extra["routed_tokens"] == 0 and layer.extra["fallback"] == fallback
    weight = pruned.model.layers[0].mlp.experts.gate_up_proj[NUM_EXPERTS - 1]
    assert int((weight == 0).sum()) == weight.numel() // 2
    assert torch.isfinite(pruned(make_ids(2)).logits).all()


def test_few_token_experts_blend_by_the_token_deficit():
    minimum = 10 ** 6  # every expert is under-calibrated: H = H_e/n + r·mean(diag H̄)·I, r = 1 − n/minimum
    seen = _record(make_moe("mixtral"), min_expert_tokens=minimum, expert_fallback="damping")
    raw = _reference("mixtral")
    names = [f"model.layers.0.mlp.experts.{e}.gate_up_proj" for e in range(NUM_EXPERTS)]
    mean = torch.stack([raw[n][0] / raw[n][1] for n in names]).mean(0)
    level = float(torch.diagonal(mean).mean())
    for n in names:
        hessian, count = raw[n]
        expected = hessian / count + (1 - count / minimum) * level * torch.eye(len(mean), dtype=torch.float64)
        assert seen[n].fallback == "damping"
        torch.testing.assert_close(seen[n].hessian.double(), expected, rtol=1e-4, atol=1e-6)


def test_expert_settings_are_validated():
    with pytest.raises(ValueError, match="expert_statistics"):
        PruningConfig(expert_statistics="all")
    with pytest.raises(ValueError, match="expert_fallback"):
        PruningConfig(expert_fallback="zero")
    with pytest.raises(ValueError, match="min_expert_tokens"):
        PruningConfig(min_expert_tokens=0)
    config = PruningConfig(expert_statistics="pooled", min_expert_tokens=8, expert_fallback="damping")
    assert PruningConfig.from_dict(config.to_dict()) == config


def test_expert_handles_are_linears_for_the_engine():
    from optimum_sparse.engine.linears import in_features, is_linear, read_weight

    block = make_moe("qwen3_moe").model.layers[0]
    handle = expert_handles(block)["mlp.experts.2.down_proj"]
    assert isinstance(handle, ExpertLinear) and is_linear(handle) and in_features(handle) == 16
    assert torch.equal(read_weight(handle, torch.device("cpu")), block.mlp.experts.down_proj[2].float())
