"""The interface of structured pruning methods (tensor math only; the engine is `optimum_sparse.structured.runner`).

A structured method sees, for one structure kind of one block (`"heads"` or `"channels"`), the float32 weight of
the output projection `[out, G·width]` (its input columns in `G` groups of `width`), its bias, and the
`InputStats` of that projection's input. It returns which groups to keep and, optionally, compensated weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from ..options import Options, option
from .base import Method
from .structured_scoring import InputStats

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig

__all__ = ["StructuredMethod", "StructuredOptions", "GroupDecision", "ALLOCATIONS", "ExpertStructureMethod"]

ALLOCATIONS = ("uniform", "threshold", "softmax")


@dataclass
class GroupDecision:
    """What a structured method decided for one module.

    Attributes:
        keep: sorted indices of the kept groups.
        weight: float32 `[out, len(keep)·width]` output-projection weight to write (`None`: the kept columns as they
            are).
        bias_delta: added to the output projection's bias (`None`: no change); a bias is created if needed.
        diagnostics: numbers for the report (relative reconstruction error, iterations, ...).
    """

    keep: torch.Tensor
    weight: Optional[torch.Tensor] = None
    bias_delta: Optional[torch.Tensor] = None
    diagnostics: dict = field(default_factory=dict)


@dataclass
class StructuredOptions(Options):
    """`method_kwargs` of the structured methods (`structprune`, `flap`, `wanda-structured`, `magnitude-structured`)."""

    allocation: Optional[str] = option(None, "Layer-wise rule: 'uniform', 'threshold' or 'softmax' (default: the "
                                             "method's own).")
    temperature: float = option(1.0, "Softmax allocation: temperature.")
    max_deviation: float = option(0.2, "Softmax allocation: per-module sparsity within this of the target.")

    def check(self, config) -> None:
        allocation = self.allocation
        if allocation == "search":
            raise ValueError("PruningConfig.method_kwargs['allocation']='search' is not a method rule: the structured "
                             "search is PruningConfig(allocation='search', allocation_kwargs={...}) (CLI: --allocation "
                             "search --allocation-kwargs '{...}'); method_kwargs['allocation'] picks the rule among "
                             f"{list(ALLOCATIONS)} (a search can start from it with allocation_kwargs['init']='method').")
        if allocation is not None and allocation not in ALLOCATIONS:
            raise ValueError(f"PruningConfig.method_kwargs['allocation'] must be one of {list(ALLOCATIONS)}, "
                             f"got {allocation!r}.")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"PruningConfig.method_kwargs['temperature'] must be a positive number, got {temperature!r}.")
        deviation = self.max_deviation
        if isinstance(deviation, bool) or not isinstance(deviation, (int, float)) or not 0 <= deviation <= 1:
            raise ValueError(f"PruningConfig.method_kwargs['max_deviation'] must be in [0, 1], got {deviation!r}.")


class StructuredMethod(Method):
    """Base class of the structured methods (`structure` in `"channels"`, `"heads"`, `"channels+heads"`).

    Subclasses set `name`, `stats` (`"norms"`: sums and squares only; `"hessian"`: also `Σ x xᵀ`) and
    `default_allocation`, and implement `select` (and `allocation_scores` for a non-uniform allocation).
    `method_kwargs`: `options_class` (`StructuredOptions`: `allocation` overrides the allocation rule, see
    `optimum_sparse.allocation.structured`).
    """

    structured: ClassVar[bool] = True
    default_allocation: ClassVar[str] = "uniform"
    options_class: ClassVar[type[Options]] = StructuredOptions
    allowed_kwargs: ClassVar[tuple] = ("allocation", "temperature", "max_deviation")

    @classmethod
    def validate_config(cls, config: "PruningConfig") -> None:
        if not config.is_structured or config.structure in ("experts", "expert-channels"):
            raise ValueError(
                f"PruningConfig.structure must be one of 'channels', 'heads', 'channels+heads' for method "
                f"{config.method!r}, got {config.structure!r}."
            )
        cls.check_options(config)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.allowed_kwargs = tuple(f.key for f in cls.options_class.fields())  # the `method_kwargs` keys

    def adds_output_bias(self) -> bool:
        """Whether `select` may return a bias delta (a bias is then created on an output projection without one)."""
        return False

    @property
    def allocation(self) -> str:
        return self.options.allocation or self.default_allocation

    def allocation_scores(self, kind: str, weight: torch.Tensor, stats: InputStats, width: int, cost: int,
                          reference_energy: float) -> torch.Tensor:
        """Per-group scores comparable across modules and blocks (lower = prune first), for the allocation.

        `cost` is the number of parameters one group removes; `reference_energy` is `Σ‖h‖²` of the block's input
        hidden states (the residual stream), for normalisation.
        """
        raise NotImplementedError(f"{self.name} has no non-uniform allocation.")

    def select(self, kind: str, weight: torch.Tensor, bias: Optional[torch.Tensor], stats: InputStats, width: int,
               keep: int) -> GroupDecision:
        """Chooses `keep` groups of the output projection `weight` (`[out, G·width]`) and their compensation."""
        raise NotImplementedError


class ExpertStructureMethod(Method):
    """Base of the two mixture-of-experts structures (`expert-removal`, `expert-channels`): one `structure`, the same
    count removed in every MoE block (the stock config has one field for it), a `criterion` option, routed-token
    norms as statistics. Subclasses set `structure`, `uniform_reason` and `check_sparsity`."""

    stats = "norms"
    structured: ClassVar[bool] = True
    per_linear: ClassVar[bool] = False
    structure: ClassVar[str] = ""
    uniform_reason: ClassVar[str] = ""  # why every MoE block loses the same count (in the allocation error)

    @classmethod
    def check_sparsity(cls, config: "PruningConfig") -> None:
        """Raises `ValueError` when `config.sparsity` has no meaning for this structure."""

    @classmethod
    def validate_config(cls, config: "PruningConfig") -> None:
        if config.structure != cls.structure:
            raise ValueError(f"PruningConfig.structure must be {cls.structure!r} for method {config.method!r}, "
                             f"got {config.structure!r}.")
        if config.allocation != "uniform" or config.layer_sparsity:
            raise ValueError(f"PruningConfig.structure={cls.structure!r} {cls.uniform_reason}; allocation must be "
                             "'uniform', no layer_sparsity.")
        cls.check_sparsity(config)
        cls.check_options(config)

    @property
    def criterion(self) -> str:
        return self.options.criterion
