"""SparseLLM on mixture-of-experts blocks: every expert's FFN, and every shared expert, solved jointly.

An expert is an FFN of its own: its inputs are the tokens the router sends to it, its target the dense expert's
output on them, and since its output enters the block scaled by the routing weight `r`, every term of a token counts
`r²` (`FFNProblem.weights`; Llama-4 scales the inputs instead, so its tokens count once; `expert_statistics="pooled"`:
every token, unweighted). Iteration 0 is SparseGPT on the same weighted statistics, and `solve_ffn` keeps the best
iterate, so no expert ends worse than SparseGPT on its weighted output error.

Experts routed fewer than `min_expert_tokens` tokens are pruned by SparseGPT on the fallback statistics
(`engine.expert_stats`), and layouts whose gate is not `φ(gate) ⊙ up` (gpt-oss's clamped `_apply_gate`) by SparseGPT per
expert; both are named in the layer reports (`"solver"`). Shared experts and dense FFNs are ordinary gated MLPs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from ..engine.capture import StopForward
from ..engine.distributed import all_reduce_scalar, all_reduce_sum
from ..engine.experts import ExpertLinear, routed_tokens
from ..engine.linears import read_weight
from .masks import layer_nm
from .sparsegpt import sparsegpt_factor, sparsegpt_prune

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.block import BlockJob
    from .sparsellm_lifecycle import SparseLLMPruning

__all__ = ["block_ffns", "prune_experts", "joint_solvable"]

logger = logging.getLogger(__name__)


def block_ffns(job: "BlockJob") -> list[tuple[Optional[str], str, str, str]]:
    """Gated or plain MLPs among a block's target linears, `(gate, up, down, activation path)`: shared experts and
    dense FFNs (`<mlp>.up_proj`/`gate_proj`/`down_proj` with the parent's `act_fn` or `activation_fn`)."""
    found = []
    for name, module in job.linears.items():
        if isinstance(module, ExpertLinear) or not name.endswith(".down_proj"):
            continue
        parent = name[: -len(".down_proj")]
        up, gate = f"{parent}.up_proj", f"{parent}.gate_proj"
        owner = job.block.get_submodule(parent)
        act = next((a for a in ("act_fn", "activation_fn") if hasattr(owner, a)), None)
        if up in job.linears and act is not None:
            found.append((gate if gate in job.linears else None, up, name, f"{parent}.{act}"))
    return found


def joint_solvable(experts: torch.nn.Module, layout) -> bool:
    """Whether the experts compute `φ(gate) ⊙ up` with `[gate; up]` rows (what `solve_ffn` models)."""
    if not layout.gated or layout.interleaved:
        return False
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is None:
        return True
    from transformers.integrations.moe import _default_apply_gate

    return gate is _default_apply_gate


def _capture(job: "BlockJob", experts: torch.nn.Module, layout, pooled: bool, parent: torch.nn.Module):
    """Per expert: the input rows `[n, d]`, their weights `[n, 1]` (over every calibration batch, this rank's share)
    and the number of tokens routed to it."""
    count = getattr(experts, layout.up_name).shape[0]
    routed = [0] * count
    rows = [[] for _ in range(count)]
    weights = [[] for _ in range(count)]
    moe_input = []

    def on_parent(module, args, kwargs):
        hidden = (list(args) + list(kwargs.values()))[0]
        moe_input.append(hidden.reshape(-1, hidden.shape[-1]).detach().to(torch.float32))

    def on_experts(module, args, kwargs):
        hidden, per_expert = routed_tokens(layout, count, args, kwargs)
        for e, (token, weight) in enumerate(per_expert):
            routed[e] += int(token.numel())
            if pooled:
                x = moe_input[-1]
                rows[e].append(x)
                weights[e].append(torch.ones(len(x), 1, device=x.device))
            else:
                rows[e].append((hidden[e] if layout.input_scaled else hidden)[token].detach().to(torch.float32))
                weights[e].append(weight.detach().to(torch.float32).unsqueeze(-1))
        raise StopForward()

    handles = [experts.register_forward_pre_hook(on_experts, with_kwargs=True)]
    if pooled:
        handles.append(parent.register_forward_pre_hook(on_parent, with_kwargs=True))
    try:
        for i in range(len(job.inputs)):
            try:
                job.forward_batch(i)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    d = getattr(experts, layout.up_name).shape[2 if not layout.transposed else 1]
    empty = torch.zeros(0, d, device=job.device)
    return ([torch.cat(r) if r else empty for r in rows],
            [torch.cat(w) if w else empty[:, :1] for w in weights], routed)


def prune_experts(method: "SparseLLMPruning", job: "BlockJob", names: list[str]) -> None:
    """Prunes the expert projections `names` of a block, each expert's FFN jointly (see the module docstring)."""
    from .sparsellm import FFNProblem, solve_ffn

    cfg, opts = method.config, method.options
    by_module: dict[int, list[str]] = {}
    for name in names:
        by_module.setdefault(id(job.linears[name].experts), []).append(name)
    parents = {id(m): n for n, m in job.block.named_modules()}
    for group in by_module.values():
        handle = job.linears[group[0]]
        experts, layout = handle.experts, handle.layout
        module_name = parents[id(experts)]
        if not joint_solvable(experts, layout):
            logger.warning("Block %d: %s computes its own gate (%s); its experts are pruned with SparseGPT.",
                           job.index, module_name, type(experts).__name__)
            _local(method, job, group, "sparsegpt (the experts' gate is not φ(gate)·up)")
            continue
        parent_name = module_name.rpartition(".")[0]
        parent = job.block.get_submodule(parent_name) if parent_name else job.block
        pooled = cfg.expert_statistics == "pooled"
        rows, weights, routed = _capture(job, experts, layout, pooled, parent)
        counts = [int(all_reduce_scalar(n)) for n in routed]
        minimum = cfg.min_expert_tokens if cfg.min_expert_tokens is not None else rows[0].shape[1]
        by_expert: dict[int, dict[str, str]] = {}
        for name in group:
            h = job.linears[name]
            by_expert.setdefault(h.index, {})[h.projection] = name
        under = [n for e, projections in by_expert.items() if not pooled and counts[e] < minimum
                 for n in projections.values()]
        if under:
            _local(method, job, under, "sparsegpt (under-calibrated expert: fallback statistics)")
        for e, projections in by_expert.items():
            if (not pooled and counts[e] < minimum) or set(projections) != set(layout.projections):
                if set(projections) != set(layout.projections):  # only one projection targeted
                    _local(method, job, list(projections.values()), "sparsegpt (one projection of the expert)")
                continue
            up_name, down_name = projections[layout.up_name], projections["down_proj"]
            up, down = job.linears[up_name], job.linears[down_name]
            w_in, w_down = read_weight(up, job.device), read_weight(down, job.device)
            b_in = up.bias.detach().to(job.device, torch.float32) if up.bias is not None else None
            b_down = down.bias.detach().to(job.device, torch.float32) if down.bias is not None else None
            chunks = list(torch.split(rows[e], opts.chunk_tokens)) or [rows[e]]
            r = list(torch.split(weights[e], opts.chunk_tokens)) or [weights[e]]
            problem = FFNProblem(chunks, None, w_in, b_in, w_down, b_down, experts.act_fn, True,
                                 weights=None if pooled else r)
            factor = []

            def sgpt(weight, hessian, name, reuse=False):
                sparsity = job.sparsity_for(job.full_name(name))
                if reuse and not factor:
                    factor.append(sparsegpt_factor(hessian, cfg.damping))
                return sparsegpt_prune(weight, hessian, sparsity, layer_nm(cfg.nm, sparsity), cfg.block_size,
                                       cfg.damping, factor=factor[0] if reuse else None)

            result = solve_ffn(
                problem, lambda w, h: sgpt(w, h, up_name, reuse=True), lambda w, h: sgpt(w, h, down_name),
                job.device, torch.device(opts.activation_device) if opts.activation_device else job.device,
                iterations=opts.iterations, alpha=opts.alpha, beta=opts.beta, gamma=opts.gamma,
                newton_steps=opts.newton_steps, refit_down=opts.refit_down, damping=cfg.damping,
                reduce_sum=all_reduce_sum, reduce_scalar=all_reduce_scalar,
            )
            extra = {"routed_tokens": counts[e], "expert_statistics": cfg.expert_statistics, "solver": "sparsellm",
                     "ffn_error": result.error, "ffn_error_sparsegpt": result.sparsegpt_error}
            job.apply_weight(up_name, w_in, result.w_in, result.mask_in, **extra)
            job.apply_weight(down_name, w_down, result.w_down, result.mask_down, **extra)


def _local(method, job, names: list[str], solver: str) -> None:
    before = len(job.reports)
    job.prune_locally(method.local, names=names)
    for report in job.reports[before:]:
        report.extra["solver"] = solver
