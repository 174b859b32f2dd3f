"""Per-expert calibration statistics, read from the router's decisions.

A forward pre-hook on each fused experts module receives `(hidden_states, top_k_index, top_k_weights)` (Llama-4:
the router-scaled inputs); each expert's statistics come from the tokens routed to it:

- `"routed"` (default): expert `e`'s up projection accumulates `w·x` for every token `x` routed to it with routing
  weight `w`, its down projection `w·φ_e(x)` (`φ_e`: the expert's own activation, `expert_intermediate`). The expert's
  output enters the block scaled by `w`, so a weight error `ΔW` costs `w²·‖ΔW x‖²` on that token: `XᵀX` is weighted by
  `w²`. Llama-4 scales the inputs instead; its statistics are those of the inputs it sees (unweighted).
- `"pooled"`: every token of the block, unweighted, for every expert (one shared `XᵀX` for the up projections; each
  expert's own activations of all tokens for its down projection), as if each expert were a dense FFN.

Experts that received fewer than `min_expert_tokens` routed tokens (default: the expert's input width `d`, below which
its `XᵀX` is rank deficient; one threshold for both projections) get `expert_fallback`, with
`r = 1 − n/min_expert_tokens` the token deficit and `H̄` the mean
per-token `XᵀX` of the module's well-calibrated experts:

- `"mean-hessian"`: `H = (1−r)·H_e/n + r·H̄` (an expert with no token takes `H̄`);
- `"damping"`: `H = H_e/n + r·mean(diag H̄)·I` (no token: a scaled identity, i.e. magnitude-like pruning);
- `"magnitude"`: the expert's projection is pruned by magnitude.

The same rules apply to the squared input norms Wanda uses (the diagonals). The routed token count and the fallback
are recorded in each expert projection's layer report.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..config import EXPERT_FALLBACKS, EXPERT_STATISTICS
from .stats import LinearStats
from .capture import StopForward
from .distributed import all_reduce_scalar, all_reduce_sum
from .experts import ExpertLinear, expert_intermediate, layout_count, routed_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig

__all__ = ["ExpertStats", "ExpertStatsCollector", "EXPERT_STATISTICS", "EXPERT_FALLBACKS"]



@dataclass
class ExpertStats(LinearStats):
    """`LinearStats` of one expert projection, with the tokens the router sent to the expert and the fallback used.

    Attributes:
        routed_tokens (`int`): calibration tokens routed to the expert (all ranks).
        fallback (`str`, *optional*): the `expert_fallback` applied, `None` for a well-calibrated expert.
    """

    routed_tokens: int = 0
    fallback: Optional[str] = None


class _Module:
    """The requested projections of one experts module and their running sums."""

    def __init__(self, experts: nn.Module, layout, d: int):
        self.experts, self.layout = experts, layout
        self.count = layout_count(experts, layout)
        self.up: dict[int, str] = {}
        self.down: dict[int, str] = {}
        self.routed = [0] * self.count
        self.calls = 0
        self.d = d
        self.label = ""


class ExpertStatsCollector:
    """Accumulates the statistics of the requested expert projections of one block over calibration forwards.

    Args:
        block: the decoder block.
        handles: `{name relative to block: ExpertLinear}` of the projections to collect.
        want_hessian: accumulate `XᵀX` (else only the squared norms).
        device: where the sums live.
        config: the run's config (`expert_statistics`, `min_expert_tokens`, `expert_fallback`).
    """

    def __init__(self, block: nn.Module, handles: dict[str, ExpertLinear], want_hessian: bool, device: torch.device,
                 config: "PruningConfig", check_finite: Optional[Callable[[str, torch.Tensor], None]] = None):
        self.block, self.want_hessian, self.device = block, want_hessian, device
        self.check_finite = check_finite or (lambda name, inputs: None)
        self.mode = getattr(config, "expert_statistics", "routed")
        self.min_tokens = getattr(config, "min_expert_tokens", None)
        self.fallback = getattr(config, "expert_fallback", "mean-hessian")
        self.modules: dict[int, _Module] = {}
        self.stats: dict[str, ExpertStats] = {}
        parents = {id(m): n.rpartition(".")[0] for n, m in block.named_modules()}
        self.parents: dict[int, nn.Module] = {}
        for name, handle in handles.items():
            group = self.modules.get(id(handle.experts))
            if group is None:
                up = ExpertLinear(handle.experts, 0, handle.layout.up_name, handle.layout)
                group = self.modules[id(handle.experts)] = _Module(handle.experts, handle.layout, up.in_features)
                group.label = name.rsplit(".", 2)[0]  # e.g. "mlp.experts", for error messages
                parent = parents[id(handle.experts)]
                self.parents[id(handle.experts)] = block.get_submodule(parent) if parent else block
            (group.down if handle.projection == "down_proj" else group.up)[handle.index] = name
            self.stats[name] = self._zeros(handle.in_features)
        self.requested = list(handles)
        if self.mode == "routed":  # the fallback's mean needs the module's other experts too: collected, not returned
            for group in self.modules.values():
                for projection, names in ((group.layout.up_name, group.up), ("down_proj", group.down)):
                    if not names:
                        continue
                    for e in range(group.count):
                        if e not in names:
                            names[e] = f"<{projection}.{e}>"
                            self.stats[names[e]] = self._zeros(ExpertLinear(group.experts, e, projection,
                                                                            group.layout).in_features)
        self.pooled_up: dict[int, ExpertStats] = {}
        if self.mode == "pooled":
            for key, group in self.modules.items():
                if group.up:
                    shared = self._zeros(group.d)
                    self.pooled_up[key] = shared
                    for name in group.up.values():
                        self.stats[name] = shared
        self.after_call: Callable[[], None] = lambda: None
        self.windows = 1
        self.extra: dict[str, dict] = {}  # per projection: routed tokens, statistics mode, fallback (for the report)

    def _zeros(self, features: int) -> ExpertStats:
        # allocated up front, so every rank all-reduces the same tensors even where an expert got no token here
        stats = ExpertStats()
        stats.sq_norms = torch.zeros(features, dtype=torch.float64, device=self.device)
        if self.want_hessian:
            stats.hessian = torch.zeros(features, features, dtype=torch.float64, device=self.device)
        return stats

    def all_called(self) -> bool:
        return all(group.calls for group in self.modules.values())

    def called_once(self) -> bool:
        return all(group.calls == 1 for group in self.modules.values())

    def new_batch(self, windows: int) -> None:
        """Starts a calibration batch of `windows` sequences (sums are per window: independent of the batching)."""
        self.windows = windows
        for group in self.modules.values():
            group.calls = 0

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Registers the pre-hooks (on the experts modules; `"pooled"`: also on their parent MoE modules)."""
        handles = []
        for key, group in self.modules.items():
            def routed(module, args, kwargs, group=group):
                self._on_experts_call(group, args, kwargs)

            handles.append(group.experts.register_forward_pre_hook(routed, with_kwargs=True))
            if self.mode == "pooled":
                def pooled(module, args, kwargs, group=group, key=key):
                    hidden = (list(args) + list(kwargs.values()))[0]
                    self._add_pooled(group, key, hidden.reshape(-1, hidden.shape[-1]))

                handles.append(self.parents[key].register_forward_pre_hook(pooled, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _add(self, stats: ExpertStats, x: torch.Tensor, window: Optional[torch.Tensor]) -> None:
        """Adds rows `x` `[n, in]`, one `x xᵀ` product per calibration window (`window`: each row's window)."""
        if window is None:
            stats.add(x.reshape(self.windows, -1, x.shape[-1]), self.want_hessian)
            return
        for w in torch.unique(window).tolist():
            stats.add(x[window == w], self.want_hessian)

    @torch.no_grad()
    def _add_pooled(self, group: _Module, key: int, x: torch.Tensor) -> None:
        x = x.to(self.device, torch.float32)
        if group.up:
            self._add(self.pooled_up[key], x, None)
        for e, name in group.down.items():
            self._add(self.stats[name], expert_intermediate(group.experts, group.layout, e, x), None)

    @torch.no_grad()
    def _on_experts_call(self, group: _Module, args: tuple, kwargs: dict) -> None:
        group.calls += 1
        hidden, per_expert = routed_tokens(group.layout, group.count, args, kwargs)
        self.check_finite(group.label, hidden)
        per_window = hidden.shape[-2] // self.windows
        for e, (token, weight) in enumerate(per_expert):
            group.routed[e] += int(token.numel())
            if self.mode == "pooled" or token.numel() == 0 or (e not in group.up and e not in group.down):
                continue
            x = (hidden[e] if group.layout.input_scaled else hidden)[token].to(self.device, torch.float32)
            w = weight.to(self.device, torch.float32).unsqueeze(-1)
            window = token.to(self.device) // per_window
            if e in group.up:
                self._add(self.stats[group.up[e]], x * w, window)
            if e in group.down:
                self._add(self.stats[group.down[e]], expert_intermediate(group.experts, group.layout, e, x) * w, window)
        self.after_call()

    def finalize(self) -> dict[str, ExpertStats]:
        """All-reduces the sums over ranks, applies the under-calibration fallback and returns the statistics."""
        done = set()
        for stats in self.stats.values():
            if id(stats) in done:
                continue
            done.add(id(stats))
            if stats.hessian is not None:
                all_reduce_sum(stats.hessian)
            all_reduce_sum(stats.sq_norms)
            stats.num_tokens = int(all_reduce_scalar(stats.num_tokens))
        for group in self.modules.values():
            routed = [int(all_reduce_scalar(n)) for n in group.routed]
            for names in (group.up, group.down):
                for e, name in names.items():
                    self.stats[name].routed_tokens = routed[e]
                    self.extra[name] = {"routed_tokens": routed[e], "expert_statistics": self.mode}
                if self.mode == "routed" and names:
                    self._fallback(names, routed, group.d)
        for stats in {id(s): s for s in self.stats.values()}.values():
            stats.finalize()
        self.extra = {n: self.extra[n] for n in self.requested}
        return {n: self.stats[n] for n in self.requested}

    def _fallback(self, names: dict[int, str], routed: list[int], width: int) -> None:
        features = self.stats[next(iter(names.values()))].sq_norms.numel()
        minimum = self.min_tokens if self.min_tokens is not None else width  # the expert's input width, both projections
        under = [e for e in names if routed[e] < minimum]
        if not under:
            return
        calibrated = [e for e in names if routed[e] >= minimum] or [e for e in names if routed[e] > 0]

        def mean(attr: str) -> Optional[torch.Tensor]:
            if getattr(self.stats[names[under[0]]], attr) is None:
                return None
            if not calibrated:  # no expert of this module saw a token: identity statistics
                eye = torch.eye(features, dtype=torch.float64, device=self.device)
                return eye if attr == "hessian" else torch.ones(features, dtype=torch.float64, device=self.device)
            total = torch.zeros_like(getattr(self.stats[names[calibrated[0]]], attr))
            for e in calibrated:  # a running sum: one extra matrix, whatever the number of experts
                total.add_(getattr(self.stats[names[e]], attr), alpha=1.0 / routed[e])
            return total / len(calibrated)

        mean_h, mean_n = mean("hessian"), mean("sq_norms")
        level = float(mean_n.mean())  # mean diagonal of H̄
        for e in under:
            stats = self.stats[names[e]]
            stats.fallback = self.fallback
            self.extra[names[e]]["fallback"] = self.fallback
            if self.fallback == "magnitude":
                continue
            r = 1.0 - routed[e] / minimum
            own_h = stats.hessian / routed[e] if routed[e] and stats.hessian is not None else None
            own_n = stats.sq_norms / routed[e] if routed[e] else torch.zeros_like(stats.sq_norms)
            if self.fallback == "mean-hessian":
                stats.sq_norms = (1 - r) * own_n + r * mean_n
                if stats.hessian is not None:
                    stats.hessian = r * mean_h + ((1 - r) * own_h if own_h is not None else 0)
            else:  # damping scaled with the token deficit
                stats.sq_norms = own_n + r * level
                if stats.hessian is not None:
                    eye = torch.eye(features, dtype=torch.float64, device=self.device)
                    stats.hessian = (own_h if own_h is not None else 0) + r * level * eye
