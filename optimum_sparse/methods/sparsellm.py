"""SparseLLM (Bai et al., NeurIPS 2024): the FFN of each block pruned jointly through auxiliary variables.

Attention linears are pruned by SparseGPT. The FFN (`up`/`gate`/`down`, or `fc1`/`fc2`) then minimises, over sparse
weights and auxiliary activations,

    α‖s − X W_gᵀ‖² + α‖z − X W_uᵀ‖² + β‖Y − p W_dᵀ‖² + γ‖p − φ(s)⊙z‖²       (gated: SwiGLU, GeGLU)
    α‖z − X W_uᵀ‖² + β‖Y − p W_dᵀ‖² + γ‖p − φ(z)‖²                          (plain: fc1 → φ → fc2)

with X the FFN input (after the block's already-pruned attention) and Y the dense FFN output. Each iteration:

1. weights: least squares to the auxiliary targets through d×d / f×f normal equations (`XᵀX`, `pᵀp`, damped), then
   the SparseGPT solver picks the mask on that target (exact: ‖T − W̃X‖² = ‖T − W*X‖² + ‖(W* − W̃)X‖²);
2. `p`: ridge, `p = φ + (Y − φW_dᵀ)W_d(W_dᵀW_d + γ/β·I)⁻¹` with φ = φ(s)⊙z;
3. `z` (gated): closed form `(α m + γ σ p)/(α + γ σ²)`, σ = φ(s);
4. `s` (gated) or `z` (plain): element-wise Gauss-Newton steps with backtracking (every accepted step lowers the
   objective), exact for any smooth activation (SiLU, GELU) instead of the reference code's barely-moving
   gradient steps.

Iteration 0 is SparseGPT. α, β, γ are divided by the mean square of their term's initial target, so they need no
per-model tuning. The block keeps the iterate with the lowest FFN output error, then refits the down projection
on the actual (sparse) up-stream activations when that lowers the error further; the result is never worse than
SparseGPT on that error. Activations are kept in token chunks on a storage device (CPU when they would not fit).

This file is the solver (tensor math only); the method that prunes a block with it (hooks, activation capture,
device and memory choices, the all-reduce of several processes) is `sparsellm_lifecycle.py`, and mixture-of-experts
blocks `sparsellm_moe.py`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .linalg import SymmetricGram, damped_cholesky

__all__ = ["FFNProblem", "FFNResult", "solve_ffn", "SparseLLMPruning", "SparseLLMOptions"]

logger = logging.getLogger(__name__)


def _local(value):
    """The reduction of a single process: the value itself."""
    return value


@dataclass
class FFNProblem:
    """A feed-forward network and its calibration data, all float32.

    Attributes:
        inputs: token chunks of X, `[n_i, d]`, on the storage device.
        targets: token chunks of the FFN's target output Y, `[n_i, d]`, or `None` for the dense FFN's own output
            (computed from the weights in the first pass over the chunks).
        w_in: `[f_in, d]` input-side weights, the gate rows first for gated FFNs (`[W_g; W_u]`), else `W_u`.
        b_in: bias of `w_in` or `None`.
        w_down: `[d, f]` output projection; `b_down` its bias or `None`.
        act: element-wise activation φ.
        gated: `p = φ(s) ⊙ z` with `[s; z] = X w_inᵀ` (else `p = φ(z)`).
        weights: per chunk `[n_i, 1]` token weights `r`, or `None`: every term of token `t` counts `r_t²` (an
            expert's routing weight scales its output, so its errors count `r²`). Only the weight updates and the
            errors change: each token's auxiliary minimisers do not depend on a common factor of its terms.
    """

    inputs: list
    targets: Optional[list]
    w_in: torch.Tensor
    b_in: Optional[torch.Tensor]
    w_down: torch.Tensor
    b_down: Optional[torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    weights: Optional[list] = None


@dataclass
class FFNResult:
    w_in: torch.Tensor
    mask_in: torch.Tensor
    w_down: torch.Tensor
    mask_down: torch.Tensor
    history: list = field(default_factory=list)
    best: str = "sparsegpt"
    sparsegpt_error: float = float("nan")
    error: float = float("nan")


def _split(pre: torch.Tensor, gated: bool):
    if gated:
        half = pre.shape[-1] // 2
        return pre[..., :half], pre[..., half:]
    return None, pre


def _ffn_inner(pre: torch.Tensor, act, gated: bool) -> torch.Tensor:
    s, z = _split(pre, gated)
    return act(s) * z if gated else act(z)


def _linear(x, w, b):
    out = x @ w.t()
    return out + b if b is not None else out


def _silu_with_slope(x):
    sig = torch.sigmoid(x)
    phi = x * sig
    return phi, sig * (1.0 + x * (1.0 - sig))


def _relu_with_slope(x):
    positive = x > 0
    return x * positive, positive.to(x.dtype)


def _gelu_with_slope(x):
    cdf = 0.5 * (1.0 + torch.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * torch.exp(-0.5 * x * x) * 0.3989422804014327


def _autograd_with_slope(act):
    def value_and_slope(x):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            phi = act(x)
            (slope,) = torch.autograd.grad(phi, x, torch.ones_like(phi))
        return phi.detach(), slope

    return value_and_slope


def _value_and_slope(act):
    """`x -> (φ(x), φ'(x))`: closed forms for SiLU, ReLU and erf-GELU (checked against `act` on a probe), autograd
    for any other activation."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float32)
    reference = act(probe)
    for closed_form in (_silu_with_slope, _relu_with_slope, _gelu_with_slope):
        if torch.allclose(closed_form(probe)[0], reference, atol=1e-6, rtol=1e-5):
            return closed_form
    return _autograd_with_slope(act)


def _gauss_newton(v, m, p, mult, act, alpha, gamma, steps, rows_per_chunk=1024):
    """Element-wise minimiser of α(v − m)² + γ(p − φ(v)·mult)², starting at v; never increases the objective.

    Each step is a Gauss-Newton step (curvature 2α + 2γ(φ'·mult)² > 0). An element takes its step only where that
    lowers its objective; elsewhere it keeps its value and halves its step length for the next step. One
    evaluation of φ and φ' per step; rows are processed in chunks so the temporaries stay small.
    """
    value_and_slope = _value_and_slope(act)
    scalar_mult = not torch.is_tensor(mult)
    out = torch.empty_like(v)
    for start in range(0, v.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        vc, mc, pc = v[rows], m[rows], p[rows]
        kc = mult if scalar_mult else mult[rows]
        phi, slope = value_and_slope(vc)
        dv, residual = vc - mc, pc - phi * kc
        objective = alpha * dv * dv + gamma * residual * residual
        length = torch.ones_like(vc)
        for _ in range(steps):
            gain = slope * kc
            candidate = vc - length * (alpha * dv - gamma * residual * gain) / (alpha + gamma * gain * gain)
            phi, slope_c = value_and_slope(candidate)
            dc, rc = candidate - mc, pc - phi * kc
            objective_c = alpha * dc * dc + gamma * rc * rc
            better = objective_c < objective
            vc, dv, residual = torch.where(better, candidate, vc), torch.where(better, dc, dv), torch.where(better, rc, residual)
            slope, objective = torch.where(better, slope_c, slope), torch.where(better, objective_c, objective)
            length = torch.where(better, length, 0.5 * length)
        out[rows] = vc
    return out


class _RidgeSolver:
    """`p = argmin_p β‖y − p Wᵀ‖² + γ‖p − φ‖²` row-wise, for `W` of shape `[d, f]`.

    In residual form `p = φ + (y − φWᵀ) G` with `G = W(WᵀW + γ/β·I)⁻¹ = (WWᵀ + γ/β·I)⁻¹W` (push-through identity),
    factorised on the smaller of the two systems: two `[n, d] × [d, f]` products per chunk and no f×f solve.
    """

    def __init__(self, w: torch.Tensor, beta: float, gamma: float):
        wide = w.shape[0] <= w.shape[1]
        a = w.double() if wide else w.double().t()  # the factor whose Gram `a aᵀ` is the smaller system
        small = a @ a.t()
        small.diagonal().add_(gamma / beta)
        g = torch.cholesky_solve(a, torch.linalg.cholesky(small))
        self.w, self.g = w, (g if wide else g.t()).to(w.dtype)

    def solve(self, y: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        return torch.addmm(phi, torch.addmm(y, phi, self.w.t(), alpha=-1.0), self.g)


class _Chunks:
    """Token chunks of one activation tensor, kept on a storage device and computed on `device`."""

    def __init__(self, storage: torch.device, device: torch.device):
        self.storage, self.device, self.items = storage, device, []

    def append(self, t: torch.Tensor) -> None:
        self.items.append(t.to(self.storage))

    def __getitem__(self, i) -> torch.Tensor:
        return self.items[i].to(self.device)

    def __setitem__(self, i, t) -> None:
        self.items[i] = t.to(self.storage)

    def __len__(self) -> int:
        return len(self.items)


def solve_ffn(
    problem: FFNProblem,
    prune_in: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    prune_down: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    storage: Optional[torch.device] = None,
    iterations: int = 1,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    newton_steps: int = 2,
    refit_down: bool = True,
    damping: float = 0.01,
    reduce_sum: Callable[[torch.Tensor], Any] = _local,
    reduce_scalar: Callable[[float], float] = _local,
) -> FFNResult:
    """Solves one FFN jointly.

    `prune_in(W*, H)` / `prune_down(W*, H)` run the mask solver (SparseGPT) on a least-squares target with input
    Hessian `H` and return `(sparse weight, mask)`. Each pass over the token chunks does all the work that needs
    the activations (error of the current iterate, auxiliary updates, normal-equation sums), so an iteration
    reads the activations once. `reduce_sum` (in place, tensors) and `reduce_scalar` sum the statistics over the
    processes that each hold a share of the tokens (the lifecycle adapter passes the engine's all-reduce; the default
    is one process).
    """
    storage = storage or device
    gated, act = problem.gated, problem.act
    X, Y, A = _Chunks(storage, device), _Chunks(storage, device), _Chunks(storage, device)  # A: pre-activations
    R = problem.weights

    def weigh(t: torch.Tensor, i: int) -> torch.Tensor:  # a token's rows times its weight r_t
        return t if R is None else t * R[i].to(t.device)
    for i, x in enumerate(problem.inputs):
        X.append(x)
        if problem.targets is not None:
            y = problem.targets[i]
            Y.append(y - problem.b_down if problem.b_down is not None else y)
    w_in, w_down = problem.w_in.to(device), problem.w_down.to(device)
    b_in = problem.b_in.to(device) if problem.b_in is not None else None
    f_in, d = w_in.shape
    f, d_out = w_down.shape[1], w_down.shape[0]

    # fixed statistics, initial auxiliaries, and the energies that make α, β, γ scale-free
    gram_x, gram_p = SymmetricGram(d, device), SymmetricGram(f, device)
    PY = torch.zeros(f, d_out, device=device)
    sq_a = torch.zeros(f_in, device=device)
    y_energy, p_energy, tokens = 0.0, 0.0, 0
    for i in range(len(X)):
        x = X[i]
        pre = _linear(x, w_in, b_in)
        p = _ffn_inner(pre, act, gated)
        if problem.targets is None:  # the dense FFN's output, less its bias
            Y.append(p @ w_down.t())
        y = Y[i]
        gram_x.add(weigh(x, i))
        gram_p.add(weigh(p, i))
        sq_a += weigh(pre, i).pow(2).sum(0)
        y_energy += float(weigh(y, i).pow(2).sum())
        p_energy += float(weigh(p, i).pow(2).sum())
        tokens += x.shape[0]
        A.append(pre)
    for total in (gram_x.matrix, gram_p.matrix, sq_a):  # several processes: each holds a share of the tokens
        reduce_sum(total)
    H_x, H_p = gram_x.symmetric(), gram_p.symmetric()
    y_energy, p_energy, tokens = (reduce_scalar(v) for v in (y_energy, p_energy, tokens))
    halves = [f_in // 2, f_in - f_in // 2] if gated else [f_in]
    a_scale = torch.cat([part.mean().expand(len(part)) for part in torch.split(sq_a / tokens, halves)])
    alpha_vec = alpha / a_scale.clamp_min(1e-12)  # gate and up columns normalised apart
    beta_eff = beta / max(y_energy / (tokens * d_out), 1e-12)
    gamma_eff = gamma / max(p_energy / (tokens * f), 1e-12)
    y_energy = max(y_energy, 1e-30)

    def least_squares(H, XT):
        return torch.cholesky_solve(XT, damped_cholesky(H, damping)).t()

    def down_error(w, H, PY):
        """‖Y − P wᵀ‖² / ‖Y‖² from the sums `H = PᵀP`, `PY = PᵀY` (exact, float64)."""
        w64 = w.double()
        quad = float((w64 @ H.double() * w64).sum()) - 2.0 * float((w64 * PY.t().double()).sum())
        return max(y_energy + quad, 0.0) / y_energy

    # iteration 0: SparseGPT on the dense weights
    cur_in, mask_in = prune_in(w_in.clone(), H_x)
    cur_down, mask_down = prune_down(w_down.clone(), H_p)
    result = FFNResult(cur_in, mask_in, cur_down, mask_down)

    def record(error, label):
        result.history.append(error)
        if not result.history[:-1]:
            result.sparsegpt_error = error
        if error < result.error or math.isnan(result.error):
            result.w_in, result.mask_in, result.w_down, result.mask_down = cur_in, mask_in, cur_down, mask_down
            result.error, result.best = error, label
        logger.debug("SparseLLM %s: relative FFN error %.5f", label, error)

    for t in range(1, iterations + 1):
        ridge = _RidgeSolver(cur_down, beta_eff, gamma_eff)
        XA = torch.zeros(d, f_in, device=device)
        gram_p.zero_()
        PY.zero_()
        error = 0.0
        for i in range(len(X)):
            x, y, pre = X[i], Y[i], A[i]
            m = _linear(x, cur_in, b_in)
            residual = weigh(torch.addmm(y, _ffn_inner(m, act, gated), cur_down.t(), alpha=-1.0), i).view(-1)
            error += float(torch.dot(residual, residual))
            if gated:
                s, z = _split(pre, True)
                sigma = act(s)
                phi = sigma * z
            else:
                phi = act(pre)
            # p: ridge between the output target and the activation constraint
            p = ridge.solve(y, phi)
            del phi
            if gated:  # z in closed form given s, then s by Gauss-Newton given z
                (m_s, m_z), (a_s, a_z) = _split(m, True), _split(alpha_vec, True)
                z = (a_z * m_z + gamma_eff * sigma * p) / (a_z + gamma_eff * sigma.pow(2))
                s = _gauss_newton(s, m_s, p, z, act, a_s, gamma_eff, newton_steps)
                pre = torch.cat([s, z], dim=-1)
            else:
                pre = _gauss_newton(pre, m, p, 1.0, act, alpha_vec, gamma_eff, newton_steps)
            A[i] = pre
            XA.addmm_(weigh(weigh(x, i), i).t(), pre - b_in if b_in is not None else pre)
            gram_p.add(weigh(p, i))
            PY.addmm_(weigh(p, i).t(), weigh(y, i))
        for total in (XA, gram_p.matrix, PY):
            reduce_sum(total)
        H_p = gram_p.symmetric()
        record(reduce_scalar(error) / y_energy, "sparsegpt" if t == 1 else f"iteration {t - 1}")
        # weights: least squares to the auxiliary targets, then the mask solver on that target
        cur_in, mask_in = prune_in(least_squares(H_x, XA), H_x)
        cur_down, mask_down = prune_down(least_squares(H_p, PY), H_p)

    # error of the last iterate, with the sums that refit its down projection on the actual activations
    def activation_sums(w):
        """`(PᵀP, PᵀY)` of the FFN's actual activations `P` under input weights `w`."""
        gram_p.zero_()
        PY.zero_()
        for i in range(len(X)):
            p = weigh(_ffn_inner(_linear(X[i], w, b_in), act, gated), i)
            gram_p.add(p)
            PY.addmm_(p.t(), weigh(Y[i], i))
        reduce_sum(gram_p.matrix)
        reduce_sum(PY)
        return gram_p.symmetric(), PY

    H_p, PY = activation_sums(cur_in)
    record(down_error(cur_down, H_p, PY), "sparsegpt" if iterations == 0 else f"iteration {iterations}")
    if refit_down:
        if result.w_in is not cur_in:  # an earlier iterate won: its sums are needed
            H_p, PY = activation_sums(result.w_in)
        w, mask = prune_down(least_squares(H_p, PY), H_p)
        error = down_error(w, H_p, PY)
        result.history.append(error)
        if error < result.error:
            result.w_down, result.mask_down, result.error = w, mask, error
            result.best += " + down refit"
    return result


def __getattr__(name: str):
    # the method and its options live in the lifecycle adapter (kept importable from here)
    if name in ("SparseLLMPruning", "SparseLLMOptions"):
        from . import sparsellm_lifecycle

        return getattr(sparsellm_lifecycle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
