"""ALPS: exact sparsity and N:M, reconstruction error at most SparseGPT's, CG on the support, warm starts, errors."""

from __future__ import annotations

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.methods.alps import alps_factor, alps_prune, masked_cg
from optimum_sparse.methods.masks import num_pruned
from optimum_sparse.methods.sparsegpt import sparsegpt_prune

from ..engine.test_pruning import check_exact_sparsity
from ..helpers import TABLE_ARCHS, make_ids, make_model, sparsity_kwargs
from .test_methods import activations, output_error, weight

CALIB = dict(num_samples=8, seq_len=16, batch_size=4)


@pytest.mark.parametrize("setting", [0.5, 0.7, 0.9, "2:4", "4:8"])
def test_reconstruction_error_at_most_sparsegpt(setting):
    """Same layer, same calibration inputs: ALPS's output error ‖(W − Ŵ)X‖² is at most SparseGPT's."""
    nm = tuple(int(v) for v in setting.split(":")) if isinstance(setting, str) else None
    sparsity = nm[0] / nm[1] if nm else setting
    for seed in range(3):
        x = activations(512, 96, seed=seed)
        w = weight(48, 96, seed=seed)
        H = x.t() @ x
        ours = alps_prune(w, H, sparsity, nm=nm)
        reference, _ = sparsegpt_prune(w, H, sparsity, nm=nm)
        assert output_error(w, ours.weight, x) <= output_error(w, reference, x)
        assert bool((ours.weight[ours.mask] == 0).all())
        if nm is None:
            assert int(ours.mask.sum()) == num_pruned(w.numel(), sparsity)
        else:
            assert bool((ours.mask.reshape(48, -1, nm[1]).sum(-1) == nm[0]).all())


def test_cg_reaches_the_least_squares_solution_on_the_support():
    x = activations(300, 24, seed=4)
    w = weight(6, 24, seed=4)
    factor = alps_factor(x.t() @ x, 0.01)
    keep = torch.rand(6, 24, generator=torch.Generator().manual_seed(0)) > 0.6
    W0s = w * factor.scale
    solved, iterations = masked_cg(factor.hessian, W0s @ factor.hessian, torch.zeros_like(w), keep, 200, 1e-7)
    assert 0 < iterations < 200
    for r in range(6):  # exact restricted solve per row: H_SS w_S = (W0 H)_S
        s = keep[r]
        exact = torch.linalg.solve(factor.hessian[s][:, s].double(), (W0s[r] @ factor.hessian)[s].double())
        torch.testing.assert_close(solved[r, s].double(), exact, rtol=1e-3, atol=1e-4)
        assert bool((solved[r, ~s] == 0).all())


def test_warm_start_is_never_worse_and_options_are_used():
    x = activations(256, 64, seed=1)
    w = weight(32, 64, seed=1)
    H = x.t() @ x
    warm, _ = sparsegpt_prune(w, H, 0.8)
    result = alps_prune(w, H, 0.8, warm_start=warm, max_iterations=3, cg_iterations=0)
    assert result.objective <= result.objective_warm_start
    assert result.iterations == 3 and result.cg_iterations == 0
    assert result.source in ("alps", "warm_start")
    stops_early = alps_prune(w, H, 0.8)
    assert stops_early.iterations < 300  # the support-change rule stops it


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("arch", TABLE_ARCHS)
def test_exact_sparsity_on_every_architecture(arch, structure):
    model = make_model(arch)
    pruner = SparsePruner(PruningConfig(method="alps", **sparsity_kwargs(structure, 0.7), **CALIB))
    pruner.apply(model, dataset=make_ids(), progress=False)
    check_exact_sparsity(model, structure, 0.7 if structure == "unstructured" else 0.5)
    with torch.no_grad():
        assert torch.isfinite(model(make_ids()).logits).all()
    extra = pruner.report.layers[0].extra
    assert extra["alps_iterations"] >= 1 and extra["alps_objective"] <= extra["alps_objective_admm"] + 1e-9


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_block0_layer_errors_at_most_sparsegpt(arch):
    """Block 0 sees the same calibration inputs under both methods: each layer's error is at most SparseGPT's."""
    reports = {}
    for method in ("alps", "sparsegpt"):
        model = make_model(arch)
        pruner = SparsePruner(PruningConfig(method=method, sparsity=0.7, **CALIB))
        pruner.apply(model, dataset=make_ids(), progress=False)
        reports[method] = {r.name: r.relative_error for r in pruner.report.layers if ".0." in r.name}
    assert reports["alps"].keys() == reports["sparsegpt"].keys()
    for name, error in reports["alps"].items():
        assert error <= reports["sparsegpt"][name] * (1 + 1e-4) + 1e-7, name


@pytest.mark.parametrize("warm", ["sparsegpt", "sparsellm", "wanda"])
def test_warm_start_from_another_method(warm):
    model = make_model("llama")
    pruner = SparsePruner(PruningConfig(method="alps", sparsity=0.7, method_kwargs={"warm_start": warm}, **CALIB))
    pruner.apply(model, dataset=make_ids(), progress=False)
    check_exact_sparsity(model, "unstructured", 0.7)
    layers = pruner.report.layers
    assert len(layers) == 14  # the warm start's own reports are not kept
    for layer in layers:
        assert layer.extra["alps_objective"] <= layer.extra["alps_objective_warm_start"] + 1e-9
    if warm == "sparsellm":
        assert all("warm_start" in b and "ffn_error" in b["warm_start"] for b in pruner.report.blocks)


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 0}, r"method_kwargs\['rho'\] must be a positive number"),
    ({"max_iterations": -1}, r"'max_iterations'.*integer >= 0"),
    ({"update_every": 0}, r"'update_every'.*integer >= 1"),
    ({"cg_tolerance": float("nan")}, "'cg_tolerance'"),
    ({"warm_start": "alps"}, r"method_kwargs\['warm_start'\] must be None or one of"),
    ({"warm_start": "elsa"}, r"must be None or one of \[.*'wanda'\], got 'elsa'"),
    ({"warm_start_kwargs": {"iterations": 1}}, "without a 'warm_start'"),
    ({"warm_start": "sparsellm", "warm_start_kwargs": {"bogus": 1}}, "unknown SparseLLM parameters"),
    ({"lambda": 1}, "unknown ALPS parameters"),
])
def test_bad_settings_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(method="alps", method_kwargs=kwargs)


def test_per_layer_sparsity_from_an_allocation():
    """Layer-wise allocations hand the engine a `sparsity_for(name)`; ALPS prunes each layer to its own target."""
    model = make_model("llama")
    allocation = lambda name: 0.8 if "mlp" in name else 0.4  # noqa: E731
    pruner = SparsePruner(PruningConfig(method="alps", sparsity=0.6, **CALIB))
    pruner.apply(model, dataset=make_ids(), sparsity_for=allocation, progress=False)
    for layer in pruner.report.layers:
        assert layer.sparsity == pytest.approx(num_pruned(torch.Size(layer.shape).numel(), allocation(layer.name))
                                               / torch.Size(layer.shape).numel())
