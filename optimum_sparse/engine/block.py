"""`BlockJob`: everything a method may do with one decoder block during pruning.

The engine builds one job per block. A method calls `prune_locally` (one linear at a time) or, for global
methods, uses `forward`, `collect_stats` and `capture` to build its own joint problem.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..errors import NonFiniteActivationError
from ..report import LayerReport
from .distributed import all_reduce_scalar, all_reduce_sum
from .stats import LinearStats
from .architectures import ArchitectureSpec
from .capture import BlockInputs, StopForward
from .devices import move_to
from .experts import ExpertLinear, table_name
from .expert_stats import ExpertStatsCollector
from .linears import read_weight, write_weight

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig
    from ..methods.base import PruningMethod

__all__ = ["BlockJob", "LayerReport"]

logger = logging.getLogger(__name__)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockJob:
    """One decoder block on its solve device, with its calibration inputs.

    Args:
        block: the decoder block, already on `device`.
        index: block index.
        prefix: full module name of the block (e.g. `"model.layers.3"`).
        spec: architecture entry (linear groups and MLP layout).
        linears: target linears of this block, `{name relative to block: module}` in forward order.
        inputs: the block's calibration inputs (on the storage device).
        device: solve device.
        config: the pruning config.
        sparsity_for: returns the target sparsity of a linear from its full name.
    """

    def __init__(
        self,
        block: nn.Module,
        index: int,
        prefix: str,
        spec: ArchitectureSpec,
        linears: dict[str, nn.Module],
        inputs: BlockInputs,
        device: torch.device,
        config: "PruningConfig",
        sparsity_for: Callable[[str], float],
    ):
        self.block = block
        self.index = index
        self.prefix = prefix
        self.spec = spec
        self.linears = linears
        self.inputs = inputs
        self.device = device
        self.config = config
        self.sparsity_for = sparsity_for
        self.reports: list[LayerReport] = []
        self.diagnostics: dict = {}
        self.expert_extra: dict[str, dict] = {}  # expert projections: routed tokens, fallback (from collect_stats)
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Wall time since the job was built (the block onloaded, before any work on it)."""
        return time.perf_counter() - self.started

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    # ----- forward passes -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_batch(self, i: int, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs the block on calibration batch `i` and returns its output hidden states (on `device`).

        `hidden` replaces the batch's hidden states (e.g. the dense model's stream), keeping its other arguments.
        """
        hidden = (self.inputs.hidden[i] if hidden is None else hidden).to(self.device)
        args = move_to(self.inputs.args[i], self.device)
        kwargs = move_to(self.inputs.kwargs[i], self.device)
        return _first(self.block(hidden, *args, **kwargs))

    @torch.no_grad()
    def forward_all(self, storage: Optional[torch.device] = None) -> list[torch.Tensor]:
        """Runs every batch; returns the outputs on `storage` (default: the inputs' device)."""
        outputs = []
        for i in range(len(self.inputs)):
            out = self.forward_batch(i)
            outputs.append(out.to(storage or self.inputs.hidden[i].device))
        return outputs

    @torch.no_grad()
    def input_of(self, i: int, modules: list[nn.Module]) -> torch.Tensor:
        """Runs batch `i` only until the first of `modules` is called and returns that call's input tensor."""

        def stop(module, args):
            raise StopForward(args[0].detach())

        handles = [m.register_forward_pre_hook(stop) for m in modules]
        try:
            self.forward_batch(i)
        except StopForward as stopped:
            return stopped.value
        finally:
            for h in handles:
                h.remove()
        raise RuntimeError(f"Block {self.index}: none of the requested modules ran in the forward pass.")

    @contextlib.contextmanager
    def capture(self, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        """Calls `fn(name, input, output)` on every forward of the given modules while the context is open."""
        handles = []
        for name, module in modules.items():
            def hook(mod, args, output, name=name):
                self.check_finite(name, args[0])
                fn(name, args[0].detach(), _first(output).detach())

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def check_finite(self, name: str, inputs: torch.Tensor) -> None:
        """Raises `NonFiniteActivationError` when the calibration inputs of linear `name` hold NaN/inf values."""
        if bool(torch.isfinite(inputs).all()):
            return
        done = f"{len(self.reports)} layer(s) of block {self.index}" + (f" and all of blocks 0-{self.index - 1}" if self.index else "")
        changed = "nothing was changed" if not self.index and not self.reports else f"{done} were already pruned in place: reload the model"
        raise NonFiniteActivationError(
            f"{self.full_name(name)}: its calibration inputs hold {int((~torch.isfinite(inputs)).sum())} non-finite "
            f"value(s) of {inputs.numel()} ({inputs.dtype}); pruning stopped before this layer, {changed}. Usual cause: "
            "float16 overflow (load the model in bfloat16 or float32)."
        )

    def collect_stats(self, names: list[str], want_hessian: bool) -> dict[str, LinearStats]:
        """Forwards every calibration batch and accumulates the input statistics of the named linears.

        When the first batch shows each named linear called exactly once per forward, later batches stop as soon
        as the last of them has run (e.g. the MLP is skipped while collecting attention statistics).
        """
        experts = {n: self.linears[n] for n in names if isinstance(self.linears[n], ExpertLinear)}
        collector = (ExpertStatsCollector(self.block, experts, want_hessian, self.device, self.config, self.check_finite)
                     if experts else None)
        names = [n for n in names if n not in experts]
        stats = {name: LinearStats() for name in names}
        shared: dict[str, str] = {}  # linears fed the very same tensor (q/k/v, gate/up) share one accumulation
        seen: dict[tuple, tuple] = {}  # holds the tensors too, so that no address is reused within a batch
        calls = dict.fromkeys(names, 0)
        stop_early = False

        def done() -> bool:
            return stop_early and all(calls.values()) and (collector is None or collector.all_called())

        def add(name, inp, out):
            calls[name] += 1
            key = (inp.data_ptr(), tuple(inp.shape), inp.dtype)
            owner = seen.get(key, (name,))[0]
            if owner != name:
                shared[name] = owner
            else:
                seen[key] = (name, inp)
                stats[name].add(inp.to(self.device), want_hessian)
            if done():
                raise StopForward()

        def after_experts():
            if done():
                raise StopForward()

        with self.capture({n: self.linears[n] for n in names}, add), \
                (collector.hooks() if collector is not None else contextlib.nullcontext()):
            if collector is not None:
                collector.after_call = after_experts
            for i in range(len(self.inputs)):
                seen.clear()
                calls.update(dict.fromkeys(names, 0))
                if collector is not None:
                    collector.new_batch(self.inputs.hidden[i].shape[0])
                try:
                    self.forward_batch(i)
                except StopForward:
                    pass
                if i == 0:
                    stop_early = all(c == 1 for c in calls.values()) and (collector is None or collector.called_once())
        for name, stat in stats.items():
            if name not in shared:  # several processes: each rank holds a share of the calibration windows
                all_reduce_sum(stat.hessian)
                all_reduce_sum(stat.sq_norms)
                stat.num_tokens = int(all_reduce_scalar(stat.num_tokens))
                stat.finalize()
        for name, owner in shared.items():
            stats[name] = stats[owner]
        if collector is not None:
            stats.update(collector.finalize())
            self.expert_extra.update(collector.extra)
        return stats

    # ----- local pruning --------------------------------------------------------------------------------------
    def groups(self) -> list[list[str]]:
        """Target linears grouped for pruning: the table's groups when `true_sequential`, else one group."""
        if not self.config.true_sequential:
            return [list(self.linears)]
        grouped, seen = [], set()
        keys = {n: table_name(n, m) for n, m in self.linears.items()}
        for group in self.spec.groups:
            names = [n for g in group for n in self.linears if keys[n] == g]
            seen.update(names)
            if names:
                grouped.append(names)
        rest = [n for n in self.linears if n not in seen]
        return grouped + ([rest] if rest else [])

    def apply_weight(self, name: str, original: torch.Tensor, new: torch.Tensor, mask: torch.Tensor,
                     stats: Optional[LinearStats] = None, **extra) -> LayerReport:
        """Writes a pruned weight into linear `name` and records its report."""
        write_weight(self.linears[name], new, self.full_name(name))
        error = None
        if stats is not None and stats.hessian is not None:
            delta = new - original
            num = torch.einsum("oi,ij,oj->", delta, stats.hessian, delta)
            den = torch.einsum("oi,ij,oj->", original, stats.hessian, original).clamp_min(1e-30)
            error = float(num / den)
        report = LayerReport(
            name=self.full_name(name),
            shape=tuple(new.shape),
            sparsity=float(mask.float().mean()),
            relative_error=error,
            extra=extra,
        )
        self.reports.append(report)
        return report

    def prune_locally(self, method: "PruningMethod", names: Optional[list[str]] = None) -> None:
        """Prunes linears one at a time on their own input statistics (magnitude, Wanda, SparseGPT)."""
        todo = set(names if names is not None else self.linears)
        for group in self.groups():
            group = [n for n in group if n in todo]
            if not group:
                continue
            stats = (
                self.collect_stats(group, want_hessian=method.stats == "hessian")
                if method.needs_calibration
                else {n: None for n in group}
            )
            for name in group:
                original = read_weight(self.linears[name], self.device)
                full = self.full_name(name)
                solver, layer_stats = method, stats[name]
                if getattr(layer_stats, "fallback", None) == "magnitude":  # an under-calibrated expert
                    solver, layer_stats = method.fallback_solver(), None
                new, mask, *extra = solver.prune_layer(full, original.clone(), layer_stats, self.sparsity_for(full))
                extra = {**(extra[0] if extra else {}), **self.expert_extra.get(name, {})}
                self.apply_weight(name, original, new, mask, stats[name], **extra)
                stats[name] = None
