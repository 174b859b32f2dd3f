"""SparseLLM: exact sparsity, finite outputs and never worse than SparseGPT on each FFN, on every architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.engine import find_blocks, get_architecture
from optimum_sparse.engine.architectures import ARCHITECTURES
from optimum_sparse.methods.linalg import SymmetricGram
from optimum_sparse.methods.sparsellm import FFNProblem, _RidgeSolver, _gauss_newton, _value_and_slope, solve_ffn

from ..helpers import TABLE_ARCHS, block_linears, make_ids, make_model, num_zeros, sparsity_kwargs, weight_out_in

CALIB = dict(num_samples=8, seq_len=16, batch_size=4)


def _prune(model, method, ids, **kwargs):
    pruner = SparsePruner(PruningConfig(method=method, **CALIB, **kwargs))
    pruner.apply(model, dataset=ids, progress=False)
    return pruner


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("arch", [a for a in TABLE_ARCHS if ARCHITECTURES[a].mlp is not None])
def test_sparsellm_exact_sparsity_and_never_worse_than_its_start(arch, structure):
    model = make_model(arch)
    ids = make_ids()
    pruner = _prune(model, "sparsellm", ids, **sparsity_kwargs(structure, 0.7))
    for name, module in block_linears(model).items():
        weight = weight_out_in(module)
        if structure == "2:4":
            groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
            assert torch.all(groups == 2), name
        else:
            assert num_zeros(module) == int(weight.numel() * 0.7 + 1e-9), name
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    blocks = pruner.report.blocks
    assert all("ffn_error" in b for b in blocks), "every block's FFN must go through the joint solver"
    for block in blocks:
        assert block["ffn_error"] <= block["ffn_error_sparsegpt"] + 1e-9
        assert block["ffn_error_history"][0] == pytest.approx(block["ffn_error_sparsegpt"])


def _block0_ffn_input(model, ids):
    """Block-0 FFN input of `model` (its attention already pruned)."""
    spec = get_architecture(model)
    up = find_blocks(model, spec)[0].get_submodule(spec.mlp.up)
    captured = []

    def hook(module, args, output):
        captured.append(args[0].detach())

    handle = up.register_forward_hook(hook)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured[0], spec


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "phi3"])
def test_ffn_error_below_sparsegpt_on_same_data(arch):
    """Block 0: both methods prune attention identically (SparseGPT), so the FFN sees the same X."""
    ids = make_ids()
    dense = make_model(arch)
    errors, inputs = {}, {}
    for method in ("sparsegpt", "sparsellm"):
        model = make_model(arch)
        _prune(model, method, ids, sparsity=0.8)
        inputs[method], spec = _block0_ffn_input(model, ids)
        errors[method] = _mlp_error(find_blocks(dense, spec)[0], find_blocks(model, spec)[0], spec, inputs[method])
    torch.testing.assert_close(inputs["sparsellm"], inputs["sparsegpt"])
    assert errors["sparsellm"] < errors["sparsegpt"]


def _mlp_output(block, spec, x):
    up = block.get_submodule(spec.mlp.up)
    down = block.get_submodule(spec.mlp.down)
    act = block.get_submodule(spec.mlp.activation)
    pre = up(x)
    if spec.mlp.fused_gate_up:
        gate, upv = pre.chunk(2, dim=-1)
        inner = act(gate) * upv
    elif spec.mlp.gate is not None:
        inner = act(block.get_submodule(spec.mlp.gate)(x)) * pre
    else:
        inner = act(pre)
    return down(inner)


def _mlp_error(dense_block, pruned_block, spec, x):
    with torch.no_grad():
        target = _mlp_output(dense_block, spec, x)
        return float((target - _mlp_output(pruned_block, spec, x)).pow(2).sum() / target.pow(2).sum())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_zero_sparsity_recovers_the_dense_ffn(arch):
    ids = make_ids()
    model = make_model(arch)
    with torch.no_grad():
        before = model(ids).logits
    _prune(model, "sparsellm", ids, sparsity=0.0)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_stay_finite(dtype):
    ids = make_ids()
    model = make_model("llama", dtype=dtype)
    _prune(model, "sparsellm", ids, sparsity=0.7)
    for name, module in block_linears(model).items():
        assert module.weight.dtype == dtype
        assert torch.isfinite(module.weight).all(), name
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_unknown_or_bad_method_kwargs_are_refused():
    with pytest.raises(ValueError, match="unknown SparseLLM parameters"):
        PruningConfig(method="sparsellm", method_kwargs={"iters": 3})
    with pytest.raises(ValueError, match="iterations"):
        PruningConfig(method="sparsellm", method_kwargs={"iterations": -1})
    with pytest.raises(ValueError, match="alpha"):
        PruningConfig(method="sparsellm", method_kwargs={"alpha": 0})


@pytest.mark.parametrize("act", [F.silu, F.gelu, lambda t: F.gelu(t, approximate="tanh")], ids=["silu", "gelu", "gelu_tanh"])
def test_gauss_newton_never_increases_the_objective_and_decreases_it(act):
    torch.manual_seed(0)
    shape = (64, 48)
    m, p, mult, v = torch.randn(shape), torch.randn(shape), torch.randn(shape), torch.randn(shape) * 2
    alpha, gamma = torch.full((48,), 0.7), 1.3

    def objective(x):
        return alpha * (x - m).pow(2) + gamma * (p - act(x) * mult).pow(2)

    out = _gauss_newton(v, m, p, mult, act, alpha, gamma, steps=5)
    assert torch.all(objective(out) <= objective(v) + 1e-6)
    assert objective(out).sum() < 0.8 * objective(v).sum()


def test_more_iterations_do_not_raise_the_block_error():
    ids = make_ids()
    errors = []
    for iterations in (0, 3):
        model = make_model("llama")
        pruner = _prune(model, "sparsellm", ids, sparsity=0.8, method_kwargs={"iterations": iterations, "refit_down": False})
        errors.append(sum(b["ffn_error"] for b in pruner.report.blocks[:1]))
    assert errors[1] <= errors[0] + 1e-9


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma2"])
def test_dense_model_target_prunes_exactly_and_stays_finite(arch):
    """`ffn_target='dense_model'` asks each FFN to make up for the error carried in from earlier blocks; on Gemma 2
    (post-FFN norm) it falls back to the dense-FFN target."""
    ids = make_ids()
    model = make_model(arch, num_layers=3)
    pruner = _prune(model, "sparsellm", ids, sparsity=0.6, method_kwargs={"ffn_target": "dense_model"})
    for name, module in block_linears(model).items():
        assert num_zeros(module) == int(weight_out_in(module).numel() * 0.6 + 1e-9), name
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    for block in pruner.report.blocks:
        assert block["ffn_error"] <= block["ffn_error_sparsegpt"] + 1e-9


def test_dense_model_target_lowers_the_output_error_on_calibration_data():
    ids = make_ids(16, 32)
    dense = make_model("opt", num_layers=4)
    with torch.no_grad():
        reference = dense(ids).logits
    errors = {}
    for target in ("dense_ffn", "dense_model"):
        model = make_model("opt", num_layers=4)
        SparsePruner(PruningConfig(method="sparsellm", sparsity=0.7, num_samples=16, seq_len=32,
                                   method_kwargs={"ffn_target": target})).apply(model, dataset=ids, progress=False)
        with torch.no_grad():
            errors[target] = float((model(ids).logits - reference).pow(2).mean())
    assert errors["dense_model"] < errors["dense_ffn"]


@pytest.mark.parametrize(
    "act", [F.silu, F.relu, F.gelu, lambda t: F.gelu(t, approximate="tanh"), torch.tanh],
    ids=["silu", "relu", "gelu", "gelu_tanh", "tanh"],
)
def test_activation_slope_matches_autograd(act):
    x = torch.linspace(-5, 5, 201, dtype=torch.float32)
    phi, slope = _value_and_slope(act)(x)
    ref = x.clone().requires_grad_(True)
    (ref_slope,) = torch.autograd.grad(act(ref).sum(), ref)
    torch.testing.assert_close(phi, act(x))
    torch.testing.assert_close(slope, ref_slope, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)], ids=["d<f", "d>f"])
def test_ridge_solver_matches_the_normal_equations(shape):
    torch.manual_seed(0)
    w, y, phi = torch.randn(shape), torch.randn(30, shape[0]), torch.randn(30, shape[1])
    beta, gamma = 0.7, 1.9
    # argmin_p β‖y − p wᵀ‖² + γ‖p − φ‖²: (βwᵀw + γI) pᵀ = βwᵀyᵀ + γφᵀ
    gram = beta * w.double().t() @ w.double() + gamma * torch.eye(shape[1], dtype=torch.float64)
    rhs = beta * y.double() @ w.double() + gamma * phi.double()
    expected = torch.linalg.solve(gram, rhs.t()).t().float()
    torch.testing.assert_close(_RidgeSolver(w, beta, gamma).solve(y, phi), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size,parts", [(1, 4), (7, 4), (64, 3), (96, 8)])
def test_symmetric_gram_equals_the_full_product(size, parts):
    gram = SymmetricGram(size, parts=parts)
    chunks = [torch.randn(40, size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for x in chunks:
        gram.add(x)
    expected = sum(x.t() @ x for x in chunks)
    torch.testing.assert_close(gram.symmetric(), expected, rtol=1e-5, atol=1e-4)


def test_dense_targets_from_the_weights_equal_given_targets():
    """`targets=None` (the dense FFN output computed in the first pass) solves the same problem as passing it."""
    gen = torch.Generator().manual_seed(0)
    d, f = 8, 24
    inputs = [torch.randn(50, d, generator=gen) for _ in range(2)]
    w_in, w_down = torch.randn(2 * f, d, generator=gen), torch.randn(d, f, generator=gen) / f**0.5
    b_down = torch.randn(d, generator=gen)
    targets = [F.silu(x @ w_in[:f].t()) * (x @ w_in[f:].t()) @ w_down.t() + b_down for x in inputs]

    def prune(weight, hessian):  # magnitude, half of each row
        keep = weight.abs() >= weight.abs().median(dim=1, keepdim=True).values
        return weight * keep, ~keep

    results = [
        solve_ffn(FFNProblem(inputs, t, w_in, None, w_down, b_down, F.silu, True), prune, prune, torch.device("cpu"))
        for t in (targets, None)
    ]
    torch.testing.assert_close(results[1].w_in, results[0].w_in, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1].w_down, results[0].w_down, rtol=1e-4, atol=1e-5)
    assert results[1].history == pytest.approx(results[0].history, rel=1e-4)


def test_gate_reading_another_input_falls_back_to_sparsegpt(caplog):
    """A gated FFN whose gate does not read the up projection's input is not the joint problem: SparseGPT prunes it."""
    model = make_model("llama", num_layers=1)
    spec = get_architecture(model)
    block = find_blocks(model, spec)[0]
    block.get_submodule(spec.mlp.gate).register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    with caplog.at_level("WARNING"):
        pruner = _prune(model, "sparsellm", make_ids(), sparsity=0.5)
    assert "does not match the gated layout" in caplog.text
    assert "ffn_error" not in pruner.report.blocks[0]
    for name in (spec.mlp.gate, spec.mlp.up, spec.mlp.down):
        module = block.get_submodule(name)
        assert num_zeros(module) == int(weight_out_in(module).numel() * 0.5), name
