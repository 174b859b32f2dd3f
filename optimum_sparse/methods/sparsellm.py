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
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..options import Options, option
from .base import PruningMethod, register_method
from .linalg import SymmetricGram, damped_cholesky
from .masks import layer_nm
from .sparsegpt import SparseGPTPruning, sparsegpt_factor, sparsegpt_prune
from ..engine.distributed import all_reduce_scalar, all_reduce_sum
from ..engine.experts import ExpertLinear
from ..engine.linears import read_weight

__all__ = ["SparseLLMPruning", "SparseLLMOptions", "FFNProblem", "solve_ffn"]

logger = logging.getLogger(__name__)

@dataclass
class SparseLLMOptions(Options):
    """`method_kwargs` of `method="sparsellm"`."""

    label = "SparseLLM"

    iterations: int = option(1, "Alternating passes over the FFN's auxiliary variables (0: SparseGPT on each linear).")
    alpha: float = option(1.0, "Weight of the up/gate output term (scale-free).")
    beta: float = option(1.0, "Weight of the activation term (scale-free).")
    gamma: float = option(1.0, "Weight of the down output term (scale-free).")
    newton_steps: int = option(2, "Newton steps of the activation update.")
    refit_down: bool = option(True, "Refit the down projection on its final mask.")
    chunk_tokens: int = option(4096, "Tokens per chunk of the FFN activations.")
    activation_device: Optional[str] = option(None, "Where the FFN activations live (default: the solve device when "
                                                    "they fit in a quarter of its free memory, else CPU).")
    ffn_target: str = option("dense_ffn", "Target of the FFN solve: the dense FFN's outputs on the pruned inputs "
                                          "('dense_ffn') or the dense model's ('dense_model').",
                             choices=("dense_ffn", "dense_model"))

    def check(self, config) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"method_kwargs['iterations'] must be an integer >= 0, got {self.iterations!r}.")
        for key in ("alpha", "beta", "gamma"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"method_kwargs[{key!r}] must be a positive number, got {value!r}.")
        if self.ffn_target not in ("dense_ffn", "dense_model"):
            raise ValueError(
                f"method_kwargs['ffn_target'] must be 'dense_ffn' or 'dense_model', got {self.ffn_target!r}."
            )


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
) -> FFNResult:
    """Solves one FFN jointly.

    `prune_in(W*, H)` / `prune_down(W*, H)` run the mask solver (SparseGPT) on a least-squares target with input
    Hessian `H` and return `(sparse weight, mask)`. Each pass over the token chunks does all the work that needs
    the activations (error of the current iterate, auxiliary updates, normal-equation sums), so an iteration
    reads the activations once.
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
        all_reduce_sum(total)
    H_x, H_p = gram_x.symmetric(), gram_p.symmetric()
    y_energy, p_energy, tokens = (all_reduce_scalar(v) for v in (y_energy, p_energy, tokens))
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
            all_reduce_sum(total)
        H_p = gram_p.symmetric()
        record(all_reduce_scalar(error) / y_energy, "sparsegpt" if t == 1 else f"iteration {t - 1}")
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
        all_reduce_sum(gram_p.matrix)
        all_reduce_sum(PY)
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


def _resolve(block: nn.Module, path: str):
    obj = block
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@register_method
class SparseLLMPruning(PruningMethod):
    """SparseLLM: attention by SparseGPT, each FFN solved jointly (see the module docstring).

    `method_kwargs`: `SparseLLMOptions` (`iterations`, `alpha`/`beta`/`gamma`, `newton_steps`, `refit_down`,
    `chunk_tokens`, `activation_device`: auto, the solve device when the FFN activations fit in a quarter of its free
    memory, else CPU; `ffn_target`).
    """

    name = "sparsellm"
    stats = "hessian"
    column_blocks = True
    options_class = SparseLLMOptions
    per_linear = False  # the FFN is solved jointly

    def __init__(self, config):
        super().__init__(config)
        self.local = SparseGPTPruning(config)
        self._dense_stream: Optional[tuple[int, list]] = None  # (block index, dense model's block outputs)

    def prune_weight(self, weight, stats, sparsity):
        return self.local.prune_weight(weight, stats, sparsity)

    def _ffn_names(self, job) -> Optional[tuple[Optional[str], str, str]]:
        mlp = job.spec.mlp
        if mlp is None:
            return None
        names = (mlp.gate, mlp.up, mlp.down)
        if any(n is not None and n not in job.linears for n in names):
            return None
        return names

    def _dense_outputs(self, job) -> list:
        """Outputs of this block, still dense, on the dense model's own stream (advanced block by block)."""
        stream = self._dense_stream
        if job.index == 0 or stream is None or stream[0] != job.index - 1:
            if job.index != 0:
                logger.warning("Block %d: the dense stream restarts here (a block was skipped).", job.index)
            hidden = job.inputs.hidden
        else:
            hidden = stream[1]
        outputs = [job.forward_batch(i, hidden[i]).to(hidden[i].device) for i in range(len(job.inputs))]
        self._dense_stream = (job.index, outputs)
        return outputs

    def prune_block(self, job) -> None:
        dense_outputs = self._dense_outputs(job) if self.options.ffn_target == "dense_model" else None
        names = self._ffn_names(job)
        experts = [n for n, m in job.linears.items() if isinstance(m, ExpertLinear)]
        if experts:  # a mixture-of-experts block: methods/sparsellm_moe.py
            self._prune_moe_block(job, experts)
            return
        if names is None:
            logger.warning("Block %d: no known FFN layout among the targets; pruning it with SparseGPT.", job.index)
            job.prune_locally(self.local)
            return
        gate, up, down = names
        ffn = {n for n in names if n is not None}
        others = [n for n in job.linears if n not in ffn]
        if others:
            job.prune_locally(self.local, names=others)
        self._prune_ffn(job, gate, up, down, dense_outputs)

    def _prune_moe_block(self, job, experts: list[str]) -> None:
        """Attention (and other linears) by SparseGPT, each shared/dense FFN jointly, then each expert jointly."""
        from ..engine.architectures import MLPSpec
        from .sparsellm_moe import block_ffns, prune_experts

        ffns = block_ffns(job)
        in_ffn = {n for ffn in ffns for n in ffn[:3] if n is not None}
        others = [n for n in job.linears if n not in in_ffn and n not in experts]
        if others:
            job.prune_locally(self.local, names=others)
        for gate, up, down, act in ffns:  # the FFN's own output as target: a shared expert's is gated afterwards
            self._prune_ffn(job, gate, up, down, None, MLPSpec(down=down, up=up, gate=gate, activation=act,
                                                               adds_to_residual=False))
        prune_experts(self, job, experts)

    @torch.no_grad()
    def _prune_ffn(self, job, gate: Optional[str], up: str, down: str, dense_outputs: Optional[list] = None,
                   mlp=None) -> None:
        opts, cfg, device = self.options, self.config, job.device
        mlp = mlp or job.spec.mlp
        act = _resolve(job.block, mlp.activation)
        gated = mlp.gated
        modules = {"up": job.linears[up], "down": job.linears[down]}
        if gate is not None:
            modules["gate"] = job.linears[gate]

        # X: FFN input (after the pruned attention); Y: dense FFN output
        storage = self._storage_device(job, device, mlp)
        captured = {"up": [], "down": [], "gate": []}

        def grab(name, inp, out):
            if name == "gate" and captured["gate"]:
                return  # the first batch's gate input is enough to check that gate and up read the same tensor
            t = out if name == "down" else inp
            captured[name].append(t.reshape(-1, t.shape[-1]).to(storage, torch.float32))

        if dense_outputs is not None and not (mlp.adds_to_residual and getattr(job.block, "do_layer_norm_before", True)):
            logger.warning("Block %d: the FFN output is normalised before the residual; using ffn_target='dense_ffn'.",
                           job.index)
            dense_outputs = None
        # Full forwards only where the block output is needed (the dense-model target) and on the first batch, whose
        # FFN output checks the formula; the other batches stop at the FFN input, and the dense FFN output is then
        # computed from the weights (SparseLLM's first pass does it anyway).
        full = len(job.inputs) if dense_outputs is not None else 1
        corrections = []
        with job.capture(modules, grab):
            for i in range(full):
                out = job.forward_batch(i)
                if dense_outputs is not None:
                    # the dense model's block output minus this block's: the FFN is asked to make up for the
                    # pruned attention and for the error carried in from earlier blocks
                    delta = dense_outputs[i].to(out.device) - out
                    corrections.append(delta.reshape(-1, delta.shape[-1]).to(storage, torch.float32))
        same_input = not captured["gate"] or torch.equal(captured["gate"][0], captured["up"][0])
        for i in range(full, len(job.inputs)):
            x = job.input_of(i, [job.linears[n] for n in (gate, up) if n is not None])
            captured["up"].append(x.reshape(-1, x.shape[-1]).to(storage, torch.float32))
        X = self._rechunk(torch.cat(captured["up"]))
        first_output = captured["down"][0]
        Y = self._rechunk(torch.cat(captured["down"])) if full == len(job.inputs) else None
        del captured

        w_up = read_weight(job.linears[up], device)
        w_gate = read_weight(job.linears[gate], device) if gate is not None else None
        w_in = torch.cat([w_gate, w_up]) if gate is not None else w_up
        b_in = self._bias(job.linears[up], device, job.linears[gate] if gate is not None else None)
        w_down = read_weight(job.linears[down], device)
        b_down = self._bias(job.linears[down], device)
        problem = FFNProblem(X, Y, w_in, b_in, w_down, b_down, act, gated)
        matches = same_input and self._formula_matches(problem, first_output, device)
        if all_reduce_scalar(0.0 if matches else 1.0) > 0:  # every rank takes the same branch
            logger.warning("Block %d: FFN output does not match the %s layout; pruning it with SparseGPT.",
                           job.index, "gated" if gated else "plain")
            job.prune_locally(self.local, names=[n for n in (gate, up, down) if n is not None])
            return
        if corrections:
            problem.targets = [y + c for y, c in zip(Y, self._rechunk(torch.cat(corrections)))]
        del corrections

        in_names = [gate, up] if gate is not None else [up]
        rows = [w.shape[0] for w in ([w_gate, w_up] if gate is not None else [w_up])]

        def sgpt(weight, hessian, name, factor=None):
            sparsity = job.sparsity_for(job.full_name(name))
            return sparsegpt_prune(weight, hessian, sparsity, layer_nm(cfg.nm, sparsity), cfg.block_size,
                                   cfg.damping, factor=factor)

        input_factor = []  # XᵀX never changes: factor it once for every input-side prune

        def prune_in(weight, hessian):
            if not input_factor:
                input_factor.append(sparsegpt_factor(hessian, cfg.damping))
            parts, masks, start = [], [], 0
            for name, r in zip(in_names, rows):
                w, m = sgpt(weight[start : start + r], hessian, name, input_factor[0])
                parts.append(w)
                masks.append(m)
                start += r
            return torch.cat(parts), torch.cat(masks)

        result = solve_ffn(
            problem, prune_in, lambda w, h: sgpt(w, h, down), device, storage,
            iterations=opts.iterations, alpha=opts.alpha, beta=opts.beta, gamma=opts.gamma,
            newton_steps=opts.newton_steps, refit_down=opts.refit_down, damping=cfg.damping,
        )
        start = 0
        for name, r in zip(in_names, rows):
            original = w_in[start : start + r]
            job.apply_weight(name, original, result.w_in[start : start + r], result.mask_in[start : start + r])
            start += r
        job.apply_weight(down, w_down, result.w_down, result.mask_down)
        job.diagnostics["ffn_error_sparsegpt"] = result.sparsegpt_error
        job.diagnostics["ffn_error"] = result.error
        job.diagnostics["ffn_error_history"] = result.history
        job.diagnostics["ffn_best"] = result.best
        logger.info("Block %d FFN: relative output error %.5f (SparseGPT start %.5f, %s).",
                    job.index, result.error, result.sparsegpt_error, result.best)

    def _storage_device(self, job, device: torch.device, mlp=None) -> torch.device:
        if self.options.activation_device is not None:
            return torch.device(self.options.activation_device)
        if device.type != "cuda":
            return device
        down = job.linears[(mlp or job.spec.mlp).down]
        mlp_width = down.weight.shape[-1]
        need = 4 * job.inputs.num_tokens * (3 * mlp_width + 2 * down.weight.shape[0])
        free, _ = torch.cuda.mem_get_info(device)
        return device if need < free / 4 else torch.device("cpu")

    def _rechunk(self, t: torch.Tensor) -> list:
        return list(torch.split(t, self.options.chunk_tokens))

    @staticmethod
    def _bias(module, device, gate_module=None):
        """Bias of `module` (float32), with the gate's bias first for separate gate/up linears; `None` if none."""
        mods = ([gate_module] if gate_module is not None else []) + [module]
        if all(getattr(m, "bias", None) is None for m in mods):
            return None
        parts = []
        for m in mods:
            out = read_weight(m, device).shape[0]
            b = getattr(m, "bias", None)
            parts.append(b.detach().to(device, torch.float32) if b is not None else torch.zeros(out, device=device))
        return torch.cat(parts)

    @staticmethod
    def _formula_matches(problem: FFNProblem, first_output: torch.Tensor, device) -> bool:
        rows = min(64, first_output.shape[0])
        x = problem.inputs[0][:rows].to(device)
        y = first_output[:rows].to(device)
        pred = _linear(_ffn_inner(_linear(x, problem.w_in, problem.b_in), problem.act, problem.gated), problem.w_down, problem.b_down)
        return bool(torch.isfinite(pred).all()) and float((pred - y).norm()) <= 1e-3 * max(float(y.norm()), 1e-6) + 1e-5
