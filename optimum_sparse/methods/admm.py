"""ELSA's ADMM as a torch optimizer: the x-step is the base optimizer's step on `∇f + λ(x − z + u)`; every K steps
`z ← P_S(x + u)` (the projection onto the sparsity set) and `u ← u + α(x − z)`.

`admm_optimizer_class(AdamW)` returns `ADMMAdamW`, a subclass of the given optimizer class, so that whatever wraps
an optimizer (transformers' `Trainer`, accelerate, FSDP, LR schedulers) sees one ordinary optimizer. The ADMM state
(`z`, `u`) lives in the optimizer's `state` beside the base state, and the ADMM counters (step, λ) in the pruned
weights' parameter group, so `state_dict`/`load_state_dict` (and therefore checkpoint resumption) carry them.

Tensor math only: which weights are pruned, and at what sparsity, is decided by the caller (`integrations.elsa`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch

from .masks import layer_mask, layer_nm, nm_mask, num_pruned

__all__ = [
    "ADMMSettings", "PENALTY_SCHEDULES", "PROJECTIONS", "penalty_at", "global_masks", "admm_optimizer_class",
    "ADMMMixin",
]

logger = logging.getLogger(__name__)

PENALTY_SCHEDULES = ("constant", "linear", "cosine", "exponential")
PROJECTIONS = ("magnitude", "second_moment")
_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0


@dataclass
class ADMMSettings:
    """The ADMM part of ELSA (see `optimum_sparse.methods.elsa` for what each setting does).

    Attributes:
        names: full names of the pruned weights, in the order of the optimizer's ADMM parameter group.
        sparsities: target fraction of zeros of each; for N:M a multiple of `1/M` giving the weight's `N_i:M`.
        nm: `(n, m)`: `n` zeros in every `m` consecutive inputs (dim 1 of the weight).
        budget: `"layer"` (each weight its own count) or `"global"` (one count over all, unstructured only).
        projection: `"magnitude"` (`|x + u|`) or `"second_moment"` (`v ⊙ (x + u)²`, v = Adam's `exp_avg_sq`).
        penalty, penalty_init, penalty_schedule, total_steps: λ, from `penalty_init` to `penalty` over `total_steps`.
        interval: K, optimizer steps between z/u updates.
        alpha: dual step (over-relaxation).
        low_memory: ELSA-L: `z` in float8 (e4m3, one float32 scale per tensor), `u` in bfloat16.
        transposed: names whose weight is stored `[in, out]` (GPT-2's `Conv1D`): N:M groups run along dim 0.
        slices: fused mixture-of-experts parameters `[E, ...]`, `{name: {"sparsities": [per expert], "transposed":
            bool}}`: each expert's slice is projected on its own (its own count or N:M pattern, `[out, in]` or, when
            `transposed`, `[in, out]` storage); the name's entry in `sparsities` is the size-weighted mean.
    """

    names: list
    sparsities: list
    nm: Optional[tuple] = None
    budget: str = "layer"
    projection: str = "magnitude"
    penalty: float = 0.01
    penalty_init: Optional[float] = None
    penalty_schedule: str = "constant"
    total_steps: int = 1
    interval: int = 32
    alpha: float = 1.0
    low_memory: bool = False
    transposed: list = field(default_factory=list)
    slices: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("names")
        out.pop("sparsities")
        out.pop("transposed")
        out.pop("slices")
        return out


def penalty_at(step: int, settings: ADMMSettings) -> float:
    """λ at optimizer step `step` (constant, or from `penalty_init` to `penalty` along the schedule)."""
    end = settings.penalty
    if settings.penalty_schedule == "constant" or settings.penalty_init is None:
        return end
    start = settings.penalty_init
    t = min(max(step / max(settings.total_steps, 1), 0.0), 1.0)
    if settings.penalty_schedule == "linear":
        return start + (end - start) * t
    if settings.penalty_schedule == "cosine":
        return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * t))
    start = max(start, 1e-12)
    return start * (end / start) ** t


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def global_masks(scores: list, count: int) -> list:
    """Masks (`True` = pruned) removing exactly the `count` lowest of all `scores` together (non-negative floats).

    The threshold is found by bisection on the float32 bit patterns (which order non-negative floats), counting per
    tensor: no concatenated copy of the scores is ever made. Ties at the threshold go to the earliest positions.
    """
    total = sum(s.numel() for s in scores)
    if count <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    if count >= total:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    scores = [s.float() for s in scores]
    lo, hi = 0, 0x7F800000  # 0.0 .. +inf
    while lo < hi:  # smallest threshold t with #(score <= t) >= count
        mid = (lo + hi) // 2
        t = _bits_to_float(mid)
        if sum(int((s <= t).sum()) for s in scores) >= count:
            hi = mid
        else:
            lo = mid + 1
    t = _bits_to_float(lo)
    masks = [s < t for s in scores]
    missing = count - sum(int(m.sum()) for m in masks)
    for s, m in zip(scores, masks):
        if missing <= 0:
            break
        ties = torch.nonzero(s.flatten() == t).flatten()[:missing]
        m.view(-1)[ties] = True
        missing -= ties.numel()
    return masks


# ----- distributed tensors (FSDP2 shards parameters as DTensors) ----------------------------------------------------
def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref` (sharded the same way when `ref` is a DTensor)."""
    if not _is_dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, ref.device_mesh, ref.placements)


class ADMMMixin:
    """Adds ELSA's ADMM to a torch optimizer class (use `admm_optimizer_class`).

    The parameter group flagged `"admm": True` holds the pruned weights, in the order of `settings.names`.
    """

    def __init__(self, params, *args, admm: ADMMSettings, **kwargs):
        super().__init__(params, *args, **kwargs)
        groups = [g for g in self.param_groups if g.get("admm")]
        if len(groups) != 1:
            raise ValueError("The ADMM optimizer needs exactly one parameter group with 'admm': True (the pruned weights).")
        if len(groups[0]["params"]) != len(admm.names):
            raise ValueError(f"The ADMM group has {len(groups[0]['params'])} parameters for {len(admm.names)} names.")
        if admm.budget == "global" and admm.nm is not None:
            raise ValueError("A global budget applies to unstructured sparsity only (N:M is per group of M weights).")
        self.admm = admm
        self._pending: dict = {}  # z0/u0 computed before the base optimizer has created its state (first step)
        groups[0].setdefault("admm_step", 0)
        groups[0].setdefault("admm_penalty", penalty_at(0, admm))
        self.admm_metrics: dict = {}

    # ----- state ---------------------------------------------------------------------------------------------
    @property
    def admm_group(self) -> dict:
        return next(g for g in self.param_groups if g.get("admm"))

    @property
    def admm_params(self) -> list:
        return self.admm_group["params"]

    def _get(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(z, u)` of `p` in float32 (dequantized for ELSA-L)."""
        state = self.state[p]
        z = state["admm_z"].float()
        if "admm_z_scale" in state:
            z = z * state["admm_z_scale"]
        return z, state["admm_u"].float()

    def _set(self, p: torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> None:
        state = self.state[p]
        if self.admm.low_memory and _FP8 is not None:
            scale = (_full(z).abs().max().float() / _FP8_MAX * 1.05).clamp_min(1e-12)
            state["admm_z"], state["admm_z_scale"] = (z / scale).to(_FP8), scale
            state["admm_u"] = u.to(torch.bfloat16)
        else:
            state["admm_z"], state["admm_u"] = z.to(torch.float32), u.to(torch.float32)

    def _importance(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        if self.admm.projection != "second_moment":
            return None
        v = self.state[p].get("exp_avg_sq")
        if v is None:
            if self.state[p].get("admm_z") is None:
                return None  # before the first step: ELSA starts from the magnitude projection too
            raise ValueError(
                f"projection='second_moment' needs an Adam-type optimizer with an 'exp_avg_sq' state; "
                f"{type(self).__mro__[2].__name__} has {sorted(k for k in self.state[p] if not k.startswith('admm'))}."
            )
        if type(v).__name__.startswith("OptimState"):  # torchao's 8/4-bit optimizer states
            v = v.dequantize()
        return v.float()

    def _nm_mask(self, scores: torch.Tensor, name: str, nm: tuple) -> torch.Tensor:
        if name in self.admm.transposed:
            return nm_mask(scores.t(), *nm).t()
        return nm_mask(scores, *nm)

    def _score(self, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projection score of `value` (a full tensor) for weight `p`: `|value|`, or `v ⊙ value²`."""
        importance = self._importance(p)
        return value.abs() if importance is None else _full(importance) * value * value

    def _mask(self, index: int, score: torch.Tensor) -> torch.Tensor:
        """The per-weight projection mask of weight `index` (layer budget or N:M)."""
        slices = self.admm.slices.get(self.admm.names[index])
        if slices is not None:  # fused experts: one projection per expert's slice
            return torch.stack([self._slice_mask(s, sparsity, slices["transposed"])
                                for s, sparsity in zip(score, slices["sparsities"])])
        if self.admm.nm is not None:  # the weight's own N_i:M (layer-wise N:M allocation: N_i = sparsity_i · M)
            return self._nm_mask(score, self.admm.names[index], layer_nm(self.admm.nm, self.admm.sparsities[index]))
        return layer_mask(score, 0.0, count=num_pruned(score.numel(), self.admm.sparsities[index]))

    def _slice_mask(self, score: torch.Tensor, sparsity: float, transposed: bool) -> torch.Tensor:
        score = score.t() if transposed else score  # [out, in]: N:M groups along the inputs
        if self.admm.nm is not None:
            mask = nm_mask(score, *layer_nm(self.admm.nm, sparsity))
        else:
            mask = layer_mask(score, 0.0, count=num_pruned(score.numel(), sparsity))
        return mask.t() if transposed else mask

    def _project_all(self, values) -> list:
        """Masks for `values` (an iterable of `(param, full value)`); one weight at a time unless the budget is global
        (which needs every score at once)."""
        if self.admm.budget == "global" and self.admm.nm is None:
            return global_masks([self._score(p, v) for p, v in values], self._global_count())
        return [self._mask(i, self._score(p, v)) for i, (p, v) in enumerate(values)]

    def _global_count(self) -> int:
        """`floor(Σ numel_i · sparsity_i)`: with one sparsity for all, `floor(total · sparsity)`, as a layer's count."""
        return int(math.floor(sum(p.numel() * sp for p, sp in zip(self.admm_params, self.admm.sparsities)) + 1e-6))

    # ----- the algorithm -------------------------------------------------------------------------------------
    @torch.no_grad()
    def admm_init(self) -> None:
        """`z0 = P_S(x0)` (magnitude), `u0 = 0`, for weights without ADMM state (a resumed run already has it)."""
        params = [p for p in self.admm_params if "admm_z" not in self.state[p]]
        if not params:
            return
        if len(params) != len(self.admm_params):
            raise RuntimeError("The ADMM state is incomplete (some pruned weights have z/u, others not).")
        masks = self._project_all((p, _full(p.detach()).float()) for p in params)
        stats = _GapStats()
        for p, m in zip(params, masks):
            x = _full(p.detach()).float()
            z = x.masked_fill(m, 0.0)
            stats.add(x, z, m, None)
            self._pending[p] = (_like(z, p), torch.zeros_like(p, dtype=torch.float32))
        self.admm_metrics = stats.metrics(self.admm_group)

    def _state_or_pending(self, p) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pending[p] if p in self._pending else self._get(p)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.admm_group
        if not self._pending and any("admm_z" not in self.state[p] for p in group["params"]):
            self.admm_init()
        lam = group["admm_penalty"]
        for p in group["params"]:
            if p.grad is None:
                continue
            z, u = self._state_or_pending(p)
            p.grad.add_((p.float() - z + u).to(p.grad.dtype), alpha=lam)
        loss = super().step(closure)
        for p, (z, u) in self._pending.items():  # the base optimizer has created its own state for these by now
            self._set(p, z, u)
        self._pending = {}
        group["admm_step"] += 1
        if group["admm_step"] % self.admm.interval == 0:
            self.admm_update()
        return loss

    @torch.no_grad()
    def admm_update(self) -> None:
        """One z/u round: `z ← P_S(x + u)`, `u ← u + α(x − z)`, then λ from its schedule (u rescaled to match)."""
        group = self.admm_group
        params = group["params"]
        new_penalty = penalty_at(group["admm_step"], self.admm)
        rescale = group["admm_penalty"] / new_penalty
        global_budget = self.admm.budget == "global" and self.admm.nm is None
        masks = self._project_all((p, _full(p.float() + self._get(p)[1])) for p in params) if global_budget else None
        stats = _GapStats()
        for i, p in enumerate(params):
            z_old, u = self._get(p)
            x = p.float()
            target = _full(x + u)
            mask = masks[i] if masks is not None else self._mask(i, self._score(p, target))
            z = _like(target.masked_fill(mask, 0.0), p)
            stats.add(_full(x), _full(z), mask, _full(z_old) != 0)
            self._set(p, z, (u + self.admm.alpha * (x - z)) * rescale)
        group["admm_penalty"] = new_penalty
        self.admm_metrics = stats.metrics(group)

    @torch.no_grad()
    def current_masks(self) -> list:
        """The masks (`True` = pruned) the final projection would apply now, one per pruned weight."""
        return self._project_all((p, _full(p.detach()).float()) for p in self.admm_params)

    @torch.no_grad()
    def final_projection(self) -> dict:
        """Hard projection of the weights themselves: `x ← P_S(x)` (ELSA returns this, not z). `{name: mask}`."""
        masks = self.current_masks()
        for p, m in zip(self.admm_params, masks):
            p.masked_fill_(_like(m, p), 0.0)
        return dict(zip(self.admm.names, masks))

    @contextlib.contextmanager
    def projected(self) -> Iterator[None]:
        """Temporarily projects the weights (to evaluate the sparse model mid-run); restores them on exit."""
        saved = [p.detach().clone() for p in self.admm_params]
        try:
            self.final_projection()
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.admm_params, saved):
                    p.copy_(s)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads the base state as the base class does, and the ADMM state in its own dtypes (torch would cast it to
        the weights' dtype: float8 `z` to float32, or a float32 `z` of bfloat16 weights to bfloat16)."""
        admm = {}
        base_state = {}
        for key, value in state_dict["state"].items():
            admm[key] = {k: v for k, v in value.items() if k.startswith("admm_")}
            base_state[key] = {k: v for k, v in value.items() if not k.startswith("admm_")}
        super().load_state_dict({**state_dict, "state": base_state})
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                for k, v in admm.get(index, {}).items():
                    self.state[p][k] = v.to(p.device) if isinstance(v, torch.Tensor) else v
                index += 1


class _GapStats:
    """Accumulates `‖x − z‖² / ‖x‖²` over the pruned weights and the share of the support that moved."""

    def __init__(self):
        self.gap = self.norm = self.changed = self.kept = 0.0
        self.compared = False

    def add(self, x, z, mask, previous_support) -> None:
        self.gap += float((x - z).pow(2).sum())
        self.norm += float(x.pow(2).sum())
        self.kept += float((~mask).sum())
        if previous_support is not None:
            self.compared = True
            self.changed += float(((~mask) != previous_support).sum())

    def metrics(self, group) -> dict:
        out = {"admm_gap": math.sqrt(self.gap / max(self.norm, 1e-30)), "admm_penalty": group["admm_penalty"],
               "admm_step": group["admm_step"]}
        if self.compared:
            out["admm_support_change"] = self.changed / max(2 * self.kept, 1.0)
        return out


_CLASSES: dict = {}


def admm_optimizer_class(base: type) -> type:
    """`ADMM<Base>`: the optimizer class `base` (AdamW, Adam, SGD, 8-bit AdamW, ...) with ELSA's ADMM mixed in.

    Its constructor takes the base's arguments plus `admm=ADMMSettings(...)`; exactly one parameter group must carry
    `"admm": True` and hold the pruned weights in the order of `ADMMSettings.names`.
    """
    if issubclass(base, ADMMMixin):
        return base
    if base not in _CLASSES:
        _CLASSES[base] = type(f"ADMM{base.__name__}", (ADMMMixin, base), {"__module__": __name__})
    return _CLASSES[base]
