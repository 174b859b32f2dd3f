"""The interface every pruning method implements, and the method registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch

from ..config import register_config_check
from ..engine.stats import LinearStats
from ..options import NoOptions, Options, WithOptions

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig
    from ..engine.block import BlockJob
    from ..engine.sequential import PruningReport

__all__ = ["LinearStats", "Method", "PruningMethod", "register_method", "get_method_class", "available_methods", "warm_start_config",
           "Options", "NoOptions"]

_REGISTRY: dict[str, type["Method"]] = {}


class Method(WithOptions):
    """What every registered method has: a name, its options, the statistics it needs and its capability flags.

    The pruner reads the flags (`whole_model`, `per_linear`, `structured`) to choose the run; nothing checks which
    methods a class overrides. `PruningMethod` (weights pruned in place, unstructured or N:M) and `StructuredMethod`
    (groups removed, the model shrinks) are the two kinds; each has only the interface its runs call.
    """

    name: ClassVar[str] = ""
    stats: ClassVar[str] = "hessian"
    options_class: ClassVar[type[Options]] = NoOptions  # the method's parameters (`method_kwargs`)
    # Capabilities, read by the pruner and the allocators (never decided by looking at which methods a class overrides):
    # `whole_model`: `prune_model` runs on the whole model and gets every calibration window, splitting them across
    # processes itself (ELSA); otherwise the pruner hands each rank its own shard and the engine prunes block by block.
    whole_model: ClassVar[bool] = False
    # `per_linear`: each linear is pruned on its own statistics (`prune_layer`), so the search can build per-linear
    # variants with the method; False when `prune_block` solves linears jointly or runs another method first.
    per_linear: ClassVar[bool] = True
    # `structured`: removes whole channels/heads/experts (the model shrinks); the rest prune unstructured or N:M.
    structured: ClassVar[bool] = False

    @classmethod
    def runs_whole_model(cls) -> bool:
        """Whether `prune_model` gets every calibration window (the `whole_model` flag)."""
        return bool(cls.whole_model)

    def __init__(self, config: "PruningConfig"):
        self.config = config

    @classmethod
    def check_options(cls, config: "PruningConfig") -> None:
        """Builds and checks the method's options (`Options.check`); called by `validate_config`."""
        cls.options_from_config(config).check(config)

    @classmethod
    def validate_config(cls, config: "PruningConfig") -> None:
        """Raises `ValueError` for settings this method does not support (and bad `method_kwargs`, through
        `check_options`). Called by `PruningConfig`."""
        cls.check_options(config)

    @property
    def needs_calibration(self) -> bool:
        return self.stats != "none"


class PruningMethod(Method):
    """Base class of the methods that prune weights in place (unstructured or N:M): tensor math only, no hooks,
    devices or models.

    A subclass sets `name`, its capability flags (`whole_model`, `per_linear`, `column_blocks`) and `stats` (`"none"`,
    `"norms"` or `"hessian"`: which `LinearStats` the engine collects) and implements `prune_weight`. Its parameters
    are a dataclass `options_class` (an `optimum_sparse.options.Options`: fields with defaults and help), given as
    `PruningConfig.method_kwargs` and read as `self.options`. Methods that solve several linears jointly (SparseLLM)
    override `prune_block`, which receives a `BlockJob` from the engine. Methods that do not work block by block
    (ELSA trains the whole model) override `prune_model`.
    """

    column_blocks: ClassVar[bool] = False  # solves `config.block_size`-column blocks (the SparseGPT solver)

    @classmethod
    def validate_config(cls, config: "PruningConfig") -> None:
        """Raises `ValueError` for settings this method does not support (and bad `method_kwargs`, through
        `check_options`). Called by `PruningConfig`."""
        if config.is_structured:
            structured = sorted(n for n, c in _REGISTRY.items() if c.structured)
            raise ValueError(f"PruningConfig.structure={config.structure!r} needs a structured method {structured}; "
                             f"{config.method!r} prunes unstructured or N:M.")
        nm = config.nm
        if nm is not None and cls.column_blocks and config.block_size % nm[1]:
            raise ValueError(
                f"PruningConfig.block_size ({config.block_size}) must be a multiple of M={nm[1]} for structure "
                f"{config.structure!r}: {cls.name!r} solves {config.block_size}-column blocks, each holding whole "
                f"groups of M inputs (e.g. block_size={config.block_size // nm[1] * nm[1] or nm[1]})."
            )
        cls.check_options(config)

    def layer_nm(self, sparsity: float) -> Optional[tuple[int, int]]:
        """The N:M pattern of a layer pruned at `sparsity` (`(N_i, M)`, `N_i = sparsity · M`: layer-wise N:M
        allocation), or `None` for unstructured runs. Methods pass it where they used to pass `config.nm`."""
        from .masks import layer_nm

        return layer_nm(self.config.nm, sparsity)

    def fallback_solver(self) -> "PruningMethod":
        """The solver of an under-calibrated expert whose fallback is `"magnitude"` (the engine asks; it never imports
        a method itself)."""
        from .magnitude import MagnitudePruning

        return MagnitudePruning(self.config)

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


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under `cls.name`; a name taken by another class is refused."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`.")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"Method name {cls.name!r} is already registered by {taken.__module__}.{taken.__qualname__}; "
                         f"give {cls.__module__}.{cls.__qualname__} another `name`.")
    _REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown pruning method {name!r}; available: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def _check_method_name(config: "PruningConfig") -> None:
    if config.method not in _REGISTRY:
        raise ValueError(f"PruningConfig.method must be one of {sorted(_REGISTRY)}, got {config.method!r}.")


def _check_method_options(config: "PruningConfig") -> None:
    cls = _REGISTRY[config.method]
    if isinstance(config.method_kwargs, Options):  # the dataclass form: kept as the dict of its non-default keys
        config.method_kwargs = cls.options_from_config(config).to_kwargs()
    cls.validate_config(config)


register_config_check("method", _check_method_name)
register_config_check("method_options", _check_method_options)


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
               and not get_method_class(m).structured]  # whole channels: not a mask warm start
    if warm not in allowed:
        raise ValueError(f"method_kwargs['warm_start'] must be None or one of {allowed}, got {warm!r}.")
    if isinstance(kwargs, Options):
        kwargs = kwargs.to_kwargs()
    if not isinstance(kwargs, dict):
        raise ValueError(f"method_kwargs['warm_start_kwargs'] must be a dict, got {kwargs!r}.")
    return dataclasses.replace(config, method=warm, method_kwargs=dict(kwargs))
