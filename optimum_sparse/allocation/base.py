"""The common allocation abstraction: target modules, exact integer budgets, and the `Allocation` result.

Every allocator returns an `Allocation`: a sparsity per pruned linear (by full module name) whose pruned-parameter
count, `Σ floor(numelᵢ·sᵢ)`, equals `floor(Σ numelᵢ · target)` exactly. The ratios are built from integer counts
(`sᵢ = kᵢ / numelᵢ`), so the engine's per-layer rounding (`methods.masks.num_pruned`) reproduces the counts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence, Union

import torch.nn as nn

from ..methods.masks import num_pruned
from ..options import NoOptions, Options, WithOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..config import PruningConfig
    from ..methods.base import PruningMethod

__all__ = [
    "TargetModule", "Allocation", "Allocator", "register_allocator", "get_allocator", "available_allocators",
    "target_modules", "fit_counts", "allocation_from_counts",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type["Allocator"]] = {}


@dataclass(frozen=True)
class TargetModule:
    """A linear the run will prune: full name, relative name inside its block, block index, weight size."""

    name: str
    relative: str
    block: int
    numel: int


def target_modules(model: nn.Module, config: "PruningConfig") -> list[TargetModule]:
    """The target linears of `model` under `config` (targets minus ignore), in block and forward order."""
    from ..engine.sequential import check_targets

    spec, _, targets = check_targets(model, config)
    return [
        TargetModule(f"{spec.blocks}.{i}.{name}", name, i, module.weight.numel())
        for i, linears in enumerate(targets) for name, module in linears.items()
    ]


def fit_counts(numel: Sequence[int], ratios: Sequence[float], total: int,
               low: Union[float, Sequence[float]] = 0.0, high: Union[float, Sequence[float]] = 1.0) -> list[int]:
    """Integer pruned counts `kᵢ` close to `ratiosᵢ · numelᵢ` with `Σ kᵢ == total` exactly.

    The ratios are shifted by one common offset (found by bisection) and clipped to `[lowᵢ, highᵢ]` so that their
    parameter-weighted sum meets `total`; each count is then rounded down and the remainder (fewer than one weight per
    module) goes to the modules with the largest rounding loss. Every `kᵢ / numelᵢ` stays inside `[lowᵢ, highᵢ]`.

    Raises:
        ValueError: when `total` cannot be met inside the bounds.
    """
    n = len(numel)
    lows = [low] * n if isinstance(low, (int, float)) else list(low)
    highs = [high] * n if isinstance(high, (int, float)) else list(high)
    kmin = [math.ceil(lo * m - 1e-9) for lo, m in zip(lows, numel)]
    kmax = [min(math.floor(hi * m + 1e-9), m - 1) for hi, m in zip(highs, numel)]  # never a fully zero layer
    if any(a > b for a, b in zip(kmin, kmax)) or not sum(kmin) <= total <= sum(kmax):
        raise ValueError(
            f"Cannot prune exactly {total} of {sum(numel)} parameters with per-layer sparsities inside their bounds "
            f"(at least {sum(kmin)}, at most {sum(kmax)} prunable)."
        )

    def counts_at(shift: float) -> list[float]:
        return [min(max((r + shift) * m, a), b) for r, m, a, b in zip(ratios, numel, kmin, kmax)]

    lo_shift, hi_shift = -1.0 - max(ratios, default=0.0), 1.0 - min(ratios, default=0.0) + 1.0
    for _ in range(100):
        mid = 0.5 * (lo_shift + hi_shift)
        if sum(counts_at(mid)) < total:
            lo_shift = mid
        else:
            hi_shift = mid
    real = counts_at(hi_shift)
    counts = [min(max(math.floor(c + 1e-9), a), b) for c, a, b in zip(real, kmin, kmax)]
    remainder = total - sum(counts)
    order = sorted(range(n), key=lambda i: (-(real[i] - counts[i]), i))
    step = 1 if remainder > 0 else -1
    while remainder:
        moved = False
        for i in (order if step > 0 else reversed(order)):
            if remainder and kmin[i] <= counts[i] + step <= kmax[i]:
                counts[i] += step
                remainder -= step
                moved = True
        if not moved:  # pragma: no cover - excluded by the feasibility check above
            raise ValueError("fit_counts: no room left to place the remaining weights.")
    return counts


@dataclass
class Allocation:
    """Per-layer sparsity found by an allocator.

    Attributes:
        method (`str`): the allocator (`"uniform"`, `"owl"`, `"search"`, `"override"`).
        target (`float`): the global target sparsity, over the pruned layers' parameters.
        sparsities (`dict[str, float]`): sparsity per pruned linear, by full module name.
        numel (`dict[str, int]`): weight size per pruned linear.
        info (`dict`): allocator details (parameters, per-block scores, search history, disk and time used).
        m (`int`, *optional*): N:M runs: the structure's M; every sparsity is then `N_i / M`, the layer's pattern
            `N_i:M` (`patterns()`).
    """

    method: str
    target: float
    sparsities: dict
    numel: dict
    info: dict = field(default_factory=dict)
    m: Optional[int] = None

    def patterns(self) -> dict[str, str]:
        """N:M runs: the pattern of each pruned linear (`"3:4"`), by full module name; `{}` for unstructured runs."""
        if self.m is None:
            return {}
        return {name: f"{round(s * self.m)}:{self.m}" for name, s in self.sparsities.items()}

    def block_patterns(self) -> dict[str, str]:
        """N:M runs: the patterns used in each block with their counts (`"model.layers.0"` → `"1:4 ×2, 2:4 ×5"`)."""
        out: dict[str, dict[str, int]] = {}
        for name, pattern in self.patterns().items():
            counts = out.setdefault(_block_of(name), {})
            counts[pattern] = counts.get(pattern, 0) + 1
        return {b: ", ".join(f"{p} ×{c}" for p, c in sorted(counts.items(), key=lambda i: int(i[0].split(":")[0])))
                for b, counts in out.items()}

    def sparsity_for(self, name: str) -> float:
        """The sparsity of module `name`; this is what `SparsePruner.apply` hands to the engine."""
        try:
            return self.sparsities[name]
        except KeyError:
            raise KeyError(f"The {self.method} allocation has no sparsity for {name!r}.") from None

    @property
    def total_params(self) -> int:
        return sum(self.numel.values())

    @property
    def pruned_params(self) -> int:
        """Parameters removed by the engine under this allocation (`Σ num_pruned(numelᵢ, sᵢ)`)."""
        return sum(num_pruned(self.numel[n], s) for n, s in self.sparsities.items())

    @property
    def target_params(self) -> int:
        return num_pruned(self.total_params, self.target)

    @property
    def mean_sparsity(self) -> float:
        return self.pruned_params / self.total_params if self.total_params else 0.0

    def per_block(self) -> dict[str, float]:
        """Parameter-weighted sparsity of each block (`"model.layers.3"` → 0.71), in model order."""
        pruned: dict[str, float] = {}
        total: dict[str, int] = {}
        for name, s in self.sparsities.items():
            block = _block_of(name)
            pruned[block] = pruned.get(block, 0) + num_pruned(self.numel[name], s)
            total[block] = total.get(block, 0) + self.numel[name]
        return {b: pruned[b] / total[b] for b in total}

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "target": self.target, "mean_sparsity": self.mean_sparsity,
               "pruned_params": self.pruned_params, "target_params": self.target_params,
               "sparsities": dict(self.sparsities), "numel": dict(self.numel), "per_block": self.per_block(),
               "info": self.info}
        if self.m is not None:
            out.update(m=self.m, patterns=self.patterns(), block_patterns=self.block_patterns())
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Allocation":
        return cls(method=data["method"], target=float(data["target"]), sparsities=dict(data["sparsities"]),
                   numel={k: int(v) for k, v in data["numel"].items()}, info=dict(data.get("info") or {}),
                   m=data.get("m"))

    def table(self) -> str:
        """A markdown table of per-block sparsity (what the run report and the model card show); N:M runs add the
        block's patterns."""
        if self.m is not None:
            patterns = self.block_patterns()
            lines = ["| Block | Sparsity | Patterns |", "|---|---|---|"]
            lines += [f"| `{b}` | {100 * s:.2f}% | {patterns[b]} |" for b, s in self.per_block().items()]
            return "\n".join(lines)
        lines = ["| Block | Sparsity |", "|---|---|"]
        lines += [f"| `{b}` | {100 * s:.2f}% |" for b, s in self.per_block().items()]
        return "\n".join(lines)


def _block_of(name: str) -> str:
    """`"model.layers.3.mlp.down_proj"` → `"model.layers.3"` (up to the first numeric component)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def allocation_from_counts(method: str, target: float, modules: Sequence[TargetModule], counts: Sequence[int],
                           info: Optional[dict] = None, m: Optional[int] = None) -> Allocation:
    """Builds an `Allocation` from exact pruned counts (`sᵢ = kᵢ / numelᵢ`; N:M runs pass `m`, the counts are then
    multiples of `numelᵢ / m`)."""
    return Allocation(method=method, target=target,
                      sparsities={mod.name: k / mod.numel for mod, k in zip(modules, counts)},
                      numel={mod.name: mod.numel for mod in modules}, info=dict(info or {}), m=m)


class Allocator(WithOptions):
    """Base class of allocators: `allocate` returns an `Allocation` that meets `config.sparsity` exactly.

    A subclass sets `name`, `needs_calibration` and `options_class` (its `allocation_kwargs` as an
    `optimum_sparse.options.Options` dataclass, checked by `PruningConfig` before any model is loaded; read as
    `self.options`) and implements `allocate`.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    options_class: ClassVar[type[Options]] = NoOptions
    options_field: ClassVar[str] = "allocation_kwargs"
    options_owner: ClassVar[str] = "allocation={!r}"

    def __init__(self, config: "PruningConfig"):
        self.config = config
        self.kwargs = dict(config.allocation_kwargs)

    @classmethod
    def validate_kwargs(cls, config: "PruningConfig") -> None:
        """Raises `ValueError` for unknown or invalid `allocation_kwargs` (`Options.check`)."""
        cls.options_from_config(config).check(config)

    def allocate(self, model: nn.Module, modules: list[TargetModule], method: "PruningMethod",
                 input_ids: Optional["torch.Tensor"], progress: bool = True) -> Allocation:
        raise NotImplementedError


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    """Class decorator adding an allocator to the registry under `cls.name`; a name taken by another class is refused."""
    taken = _REGISTRY.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"Allocator name {cls.name!r} is already registered by {taken.__module__}.{taken.__qualname__}.")
    _REGISTRY[cls.name] = cls
    return cls


def get_allocator(name: str) -> type[Allocator]:
    if name not in _REGISTRY:
        raise ValueError(f"PruningConfig.allocation must be one of {sorted(_REGISTRY)}, got {name!r}.")
    return _REGISTRY[name]


def available_allocators() -> list[str]:
    return sorted(_REGISTRY)
