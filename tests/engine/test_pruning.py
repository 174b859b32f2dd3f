"""End-to-end pruning with SparsePruner on tiny random models of every architecture."""

import json

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.methods.masks import num_pruned

from ..helpers import ALL_ARCHS, GENERIC_ARCH, block_linears, make_ids, make_model, snapshot, weight_out_in

METHODS = ["magnitude", "wanda", "sparsegpt"]
STRUCTURES = {"unstructured": 0.6, "2:4": 0.5, "4:8": 0.5}


def run(model, ids=None, **config_kwargs):
    config_kwargs.setdefault("num_samples", 8)
    config_kwargs.setdefault("seq_len", 16)
    config_kwargs.setdefault("batch_size", 3)  # 8 samples: batches of 3, 3 and 2
    pruner = SparsePruner(PruningConfig(**config_kwargs))
    out = pruner.apply(model, dataset=make_ids() if ids is None else ids, progress=False)
    assert out is model
    return pruner


def check_exact_sparsity(model, structure, sparsity):
    linears = block_linears(model)
    assert linears
    for name, module in linears.items():
        w = weight_out_in(module)
        zeros = w == 0
        if structure == "unstructured":
            assert int(zeros.sum()) == num_pruned(w.numel(), sparsity), name
        else:
            n, m = map(int, structure.split(":"))
            rows, cols = w.shape
            per_group = zeros.reshape(rows, cols // m, m).sum(-1)
            assert bool((per_group == n).all()), f"{name}: groups with {per_group.unique().tolist()} zeros"
    return linears


def check_untouched(model, before, pruned_names):
    """Everything but the weights of the pruned linears is bit-identical (embeddings, lm_head, norms, biases)."""
    pruned = {f"{name}.weight" for name in pruned_names}
    after = model.state_dict()
    for key, value in before.items():
        if key not in pruned:
            assert torch.equal(after[key], value), f"{key} changed"
    assert any("embed" in k or "wte" in k for k in before.keys() - pruned)  # embeddings were among the checked


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prune_exact_sparsity(arch, method, structure):
    model = make_model(arch)
    before = snapshot(model)
    head = model.get_output_embeddings().weight.detach().clone()
    ids = make_ids()
    sparsity = STRUCTURES[structure]
    pruner = run(model, method=method, sparsity=sparsity, structure=structure)

    linears = check_exact_sparsity(model, structure, sparsity)
    check_untouched(model, before, linears)
    assert torch.equal(model.get_output_embeddings().weight, head)
    for name in linears:  # every target really changed
        assert not torch.equal(before[f"{name}.weight"], model.state_dict()[f"{name}.weight"]), name
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # the report lists every pruned layer with its measured sparsity
    report = pruner.report
    assert [r.name for r in report.layers] and {r.name for r in report.layers} == set(linears)
    assert len(report.layers) == len(linears)
    for r in report.layers:
        w = weight_out_in(linears[r.name])
        assert tuple(r.shape) == tuple(w.shape)
        assert r.sparsity == pytest.approx(float((w == 0).float().mean()), abs=1e-6)
    assert report.mean_sparsity == pytest.approx(sparsity, abs=0.01)
    assert len(report.blocks) == model.config.num_hidden_layers
    json.dumps(report.to_dict())
    if method == "sparsegpt":
        assert all(r.relative_error is not None and 0 <= r.relative_error < 1.5 for r in report.layers)
    assert model.pruning_config is pruner.config


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_prune_4_8(arch, method):
    model = make_model(arch)
    run(model, method=method, structure="4:8")
    check_exact_sparsity(model, "4:8", 0.5)


def test_gpt2_nm_groups_run_along_inputs():
    """GPT-2's Conv1D stores [in, out]: the N:M groups must be consecutive along dim 0 of the stored weight."""
    model = make_model("gpt2")
    run(model, method="magnitude", structure="2:4")
    for name, module in block_linears(model).items():
        stored = module.weight  # [in, out]
        groups = (stored == 0).t().reshape(stored.shape[1], stored.shape[0] // 4, 4).sum(-1)
        assert bool((groups == 2).all()), name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_zero_sparsity_keeps_logits(arch, method):
    model = make_model(arch)
    ids = make_ids(seed=1)
    with torch.no_grad():
        dense = model(ids).logits.clone()
    run(model, method=method, sparsity=0.0)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_true_sequential(arch):
    ids = make_ids()
    model = make_model(arch)
    run(model, ids, method="sparsegpt", sparsity=0.5, true_sequential=True)
    check_exact_sparsity(model, "unstructured", 0.5)
    reference = make_model(arch)
    run(reference, ids, method="sparsegpt", sparsity=0.5, true_sequential=False)
    linears, ref_linears = block_linears(model), block_linears(reference)
    same = [name for name in linears if torch.equal(linears[name].weight, ref_linears[name].weight)]
    if arch == GENERIC_ARCH:  # one group per block: nothing to recollect
        assert len(same) == len(linears)
    else:
        # the first group sees the same statistics; later groups see the pruned attention's outputs
        assert len(same) < len(linears)
        assert all(".0." in name or ".1." in name for name in same)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("method", ["sparsegpt"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_bf16_model(arch, method):
    model = make_model(arch, dtype=torch.bfloat16)
    before = snapshot(model)
    run(model, method=method, sparsity=0.5)
    linears = check_exact_sparsity(model, "unstructured", 0.5)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name, module in linears.items():
        assert torch.isfinite(module.weight).all(), name
    check_untouched(model, before, linears)
    with torch.no_grad():
        assert torch.isfinite(model(make_ids()).logits.float()).all()


@pytest.mark.parametrize("method", METHODS)
def test_pruned_weights_are_positive_zero(method):
    model = make_model("llama")
    with torch.no_grad():
        for module in block_linears(model).values():
            module.weight.copy_(-module.weight.abs())  # all negative: a -0.0 would show
    run(model, method=method, sparsity=0.5)
    for module in block_linears(model).values():
        w = module.weight
        assert not torch.signbit(w[w == 0]).any()


def test_sparsity_for_per_layer():
    model = make_model("llama")
    pruner = SparsePruner(PruningConfig(method="wanda", sparsity=0.5, num_samples=8, seq_len=16))
    chosen = {}

    def sparsity_for(name):
        chosen[name] = 0.25 if "mlp" in name else 0.75
        return chosen[name]

    pruner.apply(model, dataset=make_ids(), sparsity_for=sparsity_for, progress=False)
    linears = block_linears(model)
    assert set(chosen) == set(linears)
    for name, module in linears.items():
        assert int((module.weight == 0).sum()) == num_pruned(module.weight.numel(), chosen[name]), name


def test_pruning_is_reproducible():
    """Same model, data and config: the same masks. (Not bit-for-bit: MKL may pick another thread count under load,
    and SparseGPT's compensation amplifies the last-bit differences into a few flipped near-ties.)"""
    a, b = make_model("qwen2"), make_model("qwen2")
    run(a, method="sparsegpt", sparsity=0.5)
    run(b, method="sparsegpt", sparsity=0.5)
    la, lb = block_linears(a), block_linears(b)
    agree = sum(int(((la[n].weight == 0) == (lb[n].weight == 0)).sum()) for n in la)
    total = sum(la[n].weight.numel() for n in la)
    assert agree / total > 0.98


def test_magnitude_needs_no_calibration_data():
    model = make_model("opt")
    pruner = SparsePruner(PruningConfig(method="magnitude", sparsity=0.5))
    pruner.apply(model, progress=False)  # no dataset, no tokenizer
    check_exact_sparsity(model, "unstructured", 0.5)


def test_training_mode_restored():
    model = make_model("llama").train()
    run(model, method="wanda", sparsity=0.5)
    assert model.training
