"""The interface every pruning method implements, and the method registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig
    from ..engine.block import BlockJob
    from ..engine.sequential import PruningReport

__all__ = ["LinearStats", "PruningMethod", "register_method", "get_method_class", "available_methods", "warm_start_config"]

_REGISTRY: dict[str, type["PruningMethod"]] = {}


@dataclass
class LinearStats:
    """Calibration statistics of one linear layer's input.

    Each calibration window's `x xᵀ` is computed in float32 and summed in float64, so the sums do not depend on how
    the windows were batched or split across processes (a window's product is the same in any batch); `finalize`
    casts them to float32 once every window (and every rank) has been added.

    Attributes:
        hessian (`torch.Tensor`, *optional*): `Σ x xᵀ` over calibration tokens, `[in, in]`.
        sq_norms (`torch.Tensor`, *optional*): `Σ x_j²` per input feature, `[in]` (the diagonal of `hessian`).
        num_tokens (`int`): Number of tokens accumulated.
    """

    hessian: Optional[torch.Tensor] = None
    sq_norms: Optional[torch.Tensor] = None
    num_tokens: int = 0

    def add(self, inputs: torch.Tensor, want_hessian: bool) -> None:
        """Adds a batch: `[windows, tokens, in]` (one product per window) or `[tokens, in]` (one window)."""
        x = inputs.to(torch.float32)
        windows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        features = x.shape[-1]
        if want_hessian and self.hessian is None:
            self.hessian = torch.zeros(features, features, dtype=torch.float64, device=x.device)
        if self.sq_norms is None:
            self.sq_norms = torch.zeros(features, dtype=torch.float64, device=x.device)
        for window in windows:
            if want_hessian:
                self.hessian.add_(window.t() @ window)
            self.sq_norms.add_((window * window).sum(0))
        self.num_tokens += windows.shape[0] * windows.shape[1]

    def finalize(self) -> "LinearStats":
        """Casts the float64 sums to float32 (call after the last `add` and any all-reduce); returns `self`."""
        if self.hessian is not None:
            self.hessian = self.hessian.to(torch.float32)
        if self.sq_norms is not None:
            self.sq_norms = self.sq_norms.to(torch.float32)
        return self


class PruningMethod:
    """Base class of pruning methods: tensor math only, no hooks, devices or models.

    A subclass sets `name` and `stats` (`"none"`, `"norms"` or `"hessian"`: which `LinearStats` the engine
    collects) and implements `prune_weight`. Methods that solve several linears jointly (SparseLLM) override
    `prune_block`, which receives a `BlockJob` from the engine. Methods that do not work block by block (ELSA trains
    the whole model) override `prune_model`.
    """

    name: ClassVar[str] = ""
    stats: ClassVar[str] = "hessian"
    column_blocks: ClassVar[bool] = False  # solves `config.block_size`-column blocks (the SparseGPT solver)

    def __init__(self, config: "PruningConfig"):
        self.config = config

    @classmethod
    def validate_config(cls, config: "PruningConfig") -> None:
        """Raises `ValueError` for settings this method does not support. Called by `PruningConfig`."""
        if config.is_structured:
            structured = sorted(n for n, c in _REGISTRY.items() if getattr(c, "structured", False))
            raise ValueError(f"PruningConfig.structure={config.structure!r} needs a structured method {structured}; "
                             f"{config.method!r} prunes unstructured or N:M.")
        nm = config.nm
        if nm is not None and cls.column_blocks and config.block_size % nm[1]:
            raise ValueError(
                f"PruningConfig.block_size ({config.block_size}) must be a multiple of M={nm[1]} for structure "
                f"{config.structure!r}: {cls.name!r} solves {config.block_size}-column blocks, each holding whole "
                f"groups of M inputs (e.g. block_size={config.block_size // nm[1] * nm[1] or nm[1]})."
            )

    def layer_nm(self, sparsity: float) -> Optional[tuple[int, int]]:
        """The N:M pattern of a layer pruned at `sparsity` (`(N_i, M)`, `N_i = sparsity · M`: layer-wise N:M
        allocation), or `None` for unstructured runs. Methods pass it where they used to pass `config.nm`."""
        from .masks import layer_nm

        return layer_nm(self.config.nm, sparsity)

    @property
    def needs_calibration(self) -> bool:
        return self.stats != "none"

    def prune_weight(self, weight: torch.Tensor, stats: Optional[LinearStats], sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Prunes one weight matrix.

        Args:
            weight (`torch.Tensor`): float32 `[out_features, in_features]` copy; may be modified in place.
            stats (`LinearStats`, *optional*): Input statistics (`None` when `stats == "none"`).
            sparsity (`float`): Target fraction of zeros for this layer; for N:M structures a multiple of `1/M`
                giving the layer's pattern `N_i:M` (`layer_nm`), `N/M` in uniform runs.

        Returns:
            `(new_weight, mask)`: float32 weight with zeros where `mask` is `True`.
        """
        raise NotImplementedError

    def prune_layer(self, name: str, weight: torch.Tensor, stats: Optional[LinearStats],
                    sparsity: float) -> tuple[torch.Tensor, ...]:
        """Prunes the weight of the linear `name` (its full module name); the engine's entry point for local pruning.

        The default calls `prune_weight`. A method may return a third element, a dict of diagnostics recorded in the
        layer's report.
        """
        return self.prune_weight(weight, stats, sparsity)

    def prune_block(self, job: "BlockJob") -> None:
        """Prunes every target linear of a block. The default prunes each linear on its own statistics."""
        job.prune_locally(self)

    def prune_model(self, model: "torch.nn.Module", input_ids: Optional[torch.Tensor],
                    sparsity_for: Optional[Callable[[str], float]] = None, progress: bool = True,
                    tokenizer: Any = None, checkpoint: Any = None) -> "PruningReport":
        """Prunes `model` in place and returns the report. The default runs the block-sequential engine (with an
        optional `RunCheckpoint`)."""
        from ..engine.sequential import run_sequential

        return run_sequential(model, self, self.config, input_ids, sparsity_for, progress, checkpoint)


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator adding a method to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`.")
    _REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[PruningMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown pruning method {name!r}; available: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def warm_start_config(config: "PruningConfig", options: dict, exclude: tuple = ()) -> Optional["PruningConfig"]:
    """The config of the method named by `options["warm_start"]` (same run settings, its own `warm_start_kwargs`), or
    `None` when there is no warm start. Raises `ValueError` naming the option for a bad method or bad kwargs."""
    import dataclasses

    warm, kwargs = options.get("warm_start"), options.get("warm_start_kwargs") or {}
    if warm is None:
        if kwargs:
            raise ValueError("method_kwargs['warm_start_kwargs'] is given without a 'warm_start' method.")
        return None
    allowed = [m for m in available_methods() if m not in exclude and m != config.method
               and not getattr(get_method_class(m), "structured", False)]  # whole channels: not a mask warm start
    if warm not in allowed:
        raise ValueError(f"method_kwargs['warm_start'] must be None or one of {allowed}, got {warm!r}.")
    if not isinstance(kwargs, dict):
        raise ValueError(f"method_kwargs['warm_start_kwargs'] must be a dict, got {kwargs!r}.")
    return dataclasses.replace(config, method=warm, method_kwargs=dict(kwargs))
