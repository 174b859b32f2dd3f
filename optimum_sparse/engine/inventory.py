"""The truthful inventory: every parameter of the decoder blocks, pruned or skipped with a reason.

Before any weight changes, `build_inventory` walks every parameter of every decoder block and decides:

- **pruned**: the weight of a target linear, or a fused experts parameter whose expert slices are targets;
- **skipped**, with a reason: `"bias"`, `"norm"`, `"vector"` (other 1-D parameters: attention sinks, SSM `A_log`...),
  `"router"`, `"convolution"`, `"embedding"`, `"ignore"` (matched by `PruningConfig.ignore`) or `"not in targets"`.

A weight matrix (2-D, or 3-D fused experts) of a block that no rule covers raises `UnsupportedModelError` naming it,
never a silent skip. After the run, `ParameterInventory.measure` counts the zeros in the weights themselves: the
sparsity over everything that was to be pruned, per target and in total, and the share of the model's parameters
that were pruned. `PruningReport.mean_sparsity` reports that measured figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ..utils import matches_any
from .architectures import UnsupportedModelError
from .experts import ExpertLinear, find_experts_modules, is_router
from .linears import is_linear
from .validation import stored_weight

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig

__all__ = ["InventoryEntry", "ParameterInventory", "build_inventory"]

logger = logging.getLogger(__name__)


@dataclass
class InventoryEntry:
    """One parameter of a decoder block: its full name, shape, and whether it is pruned or why it is skipped."""

    name: str
    shape: tuple
    pruned: bool
    reason: Optional[str] = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape)}
        return out if self.pruned else {**out, "reason": self.reason}


@dataclass
class ParameterInventory:
    """The decoder blocks' parameters, decided before pruning, and the sparsity measured on them afterwards.

    Attributes:
        entries: every block parameter.
        targets: `{full target name: linear module or ExpertLinear}`: the matrices to prune.
        model_params: all parameters of the model (tied weights once).
        measured: filled by `measure`: per target measured sparsity and the totals.
    """

    entries: list = field(default_factory=list)
    targets: dict = field(default_factory=dict)
    model_params: int = 0
    measured: dict = field(default_factory=dict)

    @property
    def skipped(self) -> list[InventoryEntry]:
        return [e for e in self.entries if not e.pruned]

    @property
    def target_params(self) -> int:
        return sum(m.weight.numel() for m in self.targets.values())

    @torch.no_grad()
    def measure(self) -> dict:
        """Counts the zeros of every target matrix in the model's weights (offloaded ones read from their storage)."""
        per_target, zeros, total = {}, 0, 0
        for name, module in self.targets.items():
            weight = stored_weight(module)
            z, n = int((weight == 0).sum()), weight.numel()
            per_target[name] = z / n if n else 0.0
            zeros, total = zeros + z, total + n
        self.measured = {
            "sparsity": zeros / total if total else 0.0,
            "zeros": zeros,
            "target_params": total,
            "model_params": self.model_params,
            "pruned_share": total / self.model_params if self.model_params else 0.0,
            "per_target": per_target,
        }
        return self.measured

    def summary(self) -> dict:
        """What the report stores: measured totals, the skipped parameters by name with their reasons."""
        skipped = self.skipped
        reasons: dict[str, int] = {}
        for e in skipped:
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
        measured = {k: v for k, v in self.measured.items() if k != "per_target"}
        return {
            **measured,
            "skipped_reasons": reasons,
            "skipped_params": sum(torch.Size(e.shape).numel() for e in skipped),
            "skipped": [e.to_dict() for e in skipped],
        }


_NORM_HINTS = ("norm", "ln_", "layernorm")


def _skip_reason(block: nn.Module, param_name: str, param: nn.Parameter, config: "PruningConfig", full: str,
                 experts: dict) -> Optional[str]:
    owner_name, _, leaf = param_name.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    if "bias" in leaf:
        return "bias"
    norm = any(h in type(owner).__name__.lower() or h in owner_name.lower() for h in _NORM_HINTS)
    if param.dim() < 2 or (norm and not is_linear(owner)):  # Cohere's per-head q/k LayerNorm is [heads, head_dim]
        return "norm" if norm else "vector"
    if owner_name and is_router(block, owner_name):
        return "router"
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if isinstance(owner, nn.modules.conv._ConvNd):
        return "convolution"
    module_name = full.rpartition(".")[0]
    if is_linear(owner):
        return "ignore" if matches_any(module_name, owner, config.ignore) else "not in targets"
    if owner_name in experts:  # no expert slice of this parameter is a target
        names = [f"{module_name}.{e}.{leaf}" for e in range(param.shape[0])]
        return "ignore" if any(matches_any(n, object(), config.ignore) for n in names) else "not in targets"
    return None


def build_inventory(model: nn.Module, config: "PruningConfig", spec=None, blocks=None,
                    targets: Optional[list] = None) -> ParameterInventory:
    """Decides, for every parameter of the decoder blocks, pruned or skipped (with a reason).

    Raises:
        UnsupportedModelError: a weight matrix of a block is covered by no rule (named in the message).
    """
    if targets is None:
        from .sequential import check_targets

        spec, blocks, targets = check_targets(model, config)
    inventory = ParameterInventory(model_params=sum(p.numel() for p in model.parameters()))
    uncovered = []
    for i, (block, linears) in enumerate(zip(blocks, targets)):
        prefix = f"{spec.blocks}.{i}"
        pruned_params = {}
        for name, module in linears.items():
            inventory.targets[f"{prefix}.{name}"] = module
            param = module.parameter if isinstance(module, ExpertLinear) else module.weight
            pruned_params[id(param)] = True
        experts = find_experts_modules(block)
        for pname, param in block.named_parameters():
            full = f"{prefix}.{pname}"
            if id(param) in pruned_params:
                inventory.entries.append(InventoryEntry(full, tuple(param.shape), True))
                continue
            reason = _skip_reason(block, pname, param, config, full, experts)
            if reason is None:
                uncovered.append(f"{full} {tuple(param.shape)}")
                continue
            inventory.entries.append(InventoryEntry(full, tuple(param.shape), False, reason))
    if uncovered:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no rule covers these weight matrices of the decoder blocks: "
            f"{', '.join(uncovered[:8])}{' ...' if len(uncovered) > 8 else ''}. Nothing was changed. Add the layout "
            "to optimum_sparse.engine.architectures / engine.experts, or report it."
        )
    return inventory
