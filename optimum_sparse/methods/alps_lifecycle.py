"""ALPS, the method: the lifecycle around the layer solver of `alps.py` (the tensor math).

Per block, the engine hands each linear its input Gram matrix; layers fed the same input (q/k/v, gate/up) share one
factorization (`alps_factor`). With `warm_start`, another method first prunes the whole block, its weights are kept
as the ADMM's starting points and the dense weights put back (`_warm_start_weights`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ..engine.linears import read_weight
from ..options import Options, option
from .alps import ALPSFactor, ALPSResult, alps_factor, alps_prune
from .base import PruningMethod, get_method_class, register_method, warm_start_config

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.block import BlockJob

__all__ = ["ALPSPruning", "ALPSOptions"]


@dataclass
class ALPSOptions(Options):
    """`method_kwargs` of `method="alps"`."""

    label = "ALPS"

    rho: float = option(0.1, "Initial ADMM penalty.")
    max_iterations: int = option(300, "Most ADMM iterations per layer.")
    update_every: int = option(3, "Iterations between penalty updates and support checks.")
    switch_iteration: int = option(30, "After this iteration, stop when fewer than min_change of the kept weights change.")
    min_change: float = option(3e-4, "Stopping threshold on the share of kept weights that change.")
    cg_iterations: int = option(50, "Conjugate-gradient iterations of the final masked refit.")
    cg_tolerance: float = option(1e-4, "Relative residual at which the refit stops.")
    warm_start: Optional[str] = option(None, "Another method whose result on each block starts the ADMM (e.g. "
                                             "'sparsegpt'); default: ALPS's own projection of the dense weights.")
    warm_start_kwargs: dict = option(default_factory=dict, help="The warm-start method's method_kwargs.", cli=False)

    def check(self, config) -> None:
        for key in ("max_iterations", "update_every", "switch_iteration", "cg_iterations"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "update_every" else 0):
                raise ValueError(f"method_kwargs[{key!r}] must be an integer >= {1 if key == 'update_every' else 0}, "
                                 f"got {value!r}.")
        for key in ("rho", "cg_tolerance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"method_kwargs[{key!r}] must be a positive number, got {value!r}.")
        if isinstance(self.min_change, bool) or not isinstance(self.min_change, (int, float)) or self.min_change < 0:
            raise ValueError(f"method_kwargs['min_change'] must be a number >= 0, got {self.min_change!r}.")
        warm_start_config(config, self.to_dict(), exclude=("elsa",))  # validates the warm-start method and its kwargs


@register_method
class ALPSPruning(PruningMethod):
    """ALPS: layer-wise ADMM with an exact sparsity constraint (see the module docstring).

    `method_kwargs`: `ALPSOptions` (`rho`, `max_iterations`, `update_every`, `switch_iteration`, `min_change`,
    `cg_iterations`, `cg_tolerance`, `warm_start`: `None` for ALPS's own projection of the dense weights, or the
    name of another method, e.g. `"sparsegpt"` or `"sparsellm"`, whose result on each block starts the ADMM, and
    `warm_start_kwargs`: that method's `method_kwargs`).
    """

    name = "alps"
    stats = "hessian"
    options_class = ALPSOptions
    per_linear = False  # prune_block may run a warm-start method on the whole block first

    def __init__(self, config):
        super().__init__(config)
        self._factor: Optional[tuple[torch.Tensor, ALPSFactor]] = None  # (hessian, factor): shared inputs
        self._warm: dict[str, torch.Tensor] = {}
        warm_config = warm_start_config(config, self.options.to_dict(), exclude=("elsa",))
        self._warm_method = get_method_class(warm_config.method)(warm_config) if warm_config is not None else None

    def _solve(self, weight, stats, sparsity, warm_start=None) -> ALPSResult:
        if self._factor is None or self._factor[0] is not stats.hessian:
            self._factor = (stats.hessian, alps_factor(stats.hessian, self.config.damping))
        opts = {k: v for k, v in self.options.to_dict().items() if k not in ("warm_start", "warm_start_kwargs")}
        return alps_prune(weight, stats.hessian, sparsity, self.layer_nm(sparsity), self.config.damping,
                          factor=self._factor[1], warm_start=warm_start, **opts)

    def prune_weight(self, weight, stats, sparsity):
        result = self._solve(weight, stats, sparsity)
        return result.weight, result.mask

    def prune_layer(self, name, weight, stats, sparsity):
        result = self._solve(weight, stats, sparsity, self._warm.pop(name, None))
        return result.weight, result.mask, result.diagnostics()

    def prune_block(self, job: "BlockJob") -> None:
        if self._warm_method is not None:
            self._warm = _warm_start_weights(job, self._warm_method)
        try:
            job.prune_locally(self)
        finally:
            self._warm = {}
            self._factor = None


def _warm_start_weights(job: "BlockJob", method: PruningMethod) -> dict[str, torch.Tensor]:
    """Runs `method` on the block, keeps its pruned weights (by full layer name) and restores the dense ones."""
    dense = {name: module.weight.detach().clone() for name, module in job.linears.items()}
    reports, diagnostics = len(job.reports), job.diagnostics
    job.diagnostics = {}
    try:
        method.prune_block(job)
        warm = {job.full_name(name): read_weight(module, job.device) for name, module in job.linears.items()}
    finally:
        with torch.no_grad():
            for name, module in job.linears.items():
                module.weight.copy_(dense[name])
        del job.reports[reports:]
        warm_diagnostics, job.diagnostics = job.diagnostics, diagnostics
    if warm_diagnostics:
        job.diagnostics["warm_start"] = warm_diagnostics
    return warm
