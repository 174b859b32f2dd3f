"""ELSA's ADMM as a torch optimizer: the adapter that runs the solver of `admm.py` inside any training loop.

`admm_optimizer_class(AdamW)` returns `ADMMAdamW`, a subclass of the given optimizer class, so that whatever wraps
an optimizer (transformers' `Trainer`, accelerate, FSDP, LR schedulers) sees one ordinary optimizer. The ADMM state
(`z`, `u`) lives in the optimizer's `state` beside the base state (ELSA-L: `z` in float8 with one float32 scale, `u` in
bfloat16), and the ADMM counters (step, λ) in the pruned weights' parameter group, so `state_dict`/`load_state_dict`
(and therefore checkpoint resumption) carry them. Parameters sharded by FSDP2 (DTensors) are projected whole.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .admm import (ADMMSettings, GapStats, global_count, global_masks, penalty_at, projection_score, proximal_term,
                   u_step, weight_mask, z_step)

__all__ = ["ADMMMixin", "admm_optimizer_class"]

_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0


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

    def _score(self, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projection score of `value` (a full tensor) for weight `p`: `|value|`, or `v ⊙ value²`."""
        importance = self._importance(p)
        return projection_score(value, None if importance is None else _full(importance))

    def _project_all(self, values) -> list:
        """Masks for `values` (an iterable of `(param, full value)`); one weight at a time unless the budget is global
        (which needs every score at once)."""
        if self.admm.budget == "global" and self.admm.nm is None:
            return global_masks([self._score(p, v) for p, v in values],
                                global_count([p.numel() for p in self.admm_params], self.admm))
        return [weight_mask(self._score(p, v), i, self.admm) for i, (p, v) in enumerate(values)]

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
        stats = GapStats()
        for p, m in zip(params, masks):
            x = _full(p.detach()).float()
            z = z_step(x, m)
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
            p.grad.add_(proximal_term(p.float(), z, u).to(p.grad.dtype), alpha=lam)
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
        stats = GapStats()
        for i, p in enumerate(params):
            z_old, u = self._get(p)
            x = p.float()
            target = _full(x + u)
            mask = masks[i] if masks is not None else weight_mask(self._score(p, target), i, self.admm)
            z = _like(z_step(target, mask), p)
            stats.add(_full(x), _full(z), mask, _full(z_old) != 0)
            self._set(p, z, u_step(u, x, z, self.admm.alpha, rescale))
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
