"""`PruningReport`: the one result of a pruning run, from the engine's block loop to `pruning_report.json`.

The engine fills what the blocks did (layers, blocks, timing, allocation, diagnostics, inventory); `from_run` adds
what only the pruner knows (the config, the calibration actually used, the base model); evaluation adds perplexity
and accuracy; `to_dict`/`from_dict` are the saved format. `PruningRecord` is the same class under its old name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from .config import PruningConfig
from .version import __version__

__all__ = ["LayerReport", "PruningReport", "PruningRecord", "RECORD_FORMAT_VERSION", "describe_calibration"]

logger = logging.getLogger(__name__)

RECORD_FORMAT_VERSION = 1


@dataclass
class LayerReport:
    """What happened to one linear layer (or expert projection)."""

    name: str
    shape: tuple
    sparsity: float
    relative_error: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "sparsity": self.sparsity}
        if self.relative_error is not None:
            out["relative_error"] = self.relative_error
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LayerReport":
        data = dict(data)
        return cls(name=data.pop("name"), shape=tuple(data.pop("shape")), sparsity=data.pop("sparsity"),
                   relative_error=data.pop("relative_error", None), extra=data)


@dataclass
class PruningReport:
    """Everything worth knowing about how a model was pruned; saved as `pruning_report.json`.

    Args:
        method (`str`): the method's registered name (the config's, when there is one).
        layers (`list[LayerReport]`): per pruned linear: name, shape `[out, in]`, sparsity, relative reconstruction
            error `‖ΔW X‖² / ‖W X‖²` on the calibration inputs (when the method measured it).
        blocks (`list[dict]`): per-block timing and method diagnostics.
        seconds (`float`): pruning wall time.
        allocation (`dict`, *optional*): the layer-wise allocation (`Allocation.to_dict()`) when one was used.
        diagnostics (`dict`): run-level method diagnostics (ELSA's training history, a warm start, expert removal).
        inventory (`dict`, *optional*): `engine.inventory` summary: the sparsity measured on the weights over every
            target matrix, the share of the model's parameters pruned, every skipped parameter by name with its reason.
        config (`PruningConfig`, *optional*): the run's configuration (set by `from_run`; every saved report has it).
        calibration (`dict`): the calibration data actually used: `source`, `num_samples`, `seq_len`, `seed`.
        perplexity (`dict`, *optional*): `{"dense", "pruned", "dataset", "seq_len", "windows"}` when measured.
        accuracy (`dict`, *optional*): lm-eval accuracy when measured (`optimum_sparse.eval.accuracy_table`).
        base_model (`str`, *optional*): the Hub id of the model that was pruned.
        library_version (`str`): optimum-sparse version that pruned the model.
        masks (`dict[str, torch.BoolTensor]`, *optional*): filled by `load_pruning_record`: `True` where the weight is
            zero, by module name, in the layout of the checkpoint's `<name>.weight` tensor.
    """

    method: str = ""
    layers: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    seconds: float = 0.0
    allocation: Optional[dict] = None
    diagnostics: dict = field(default_factory=dict)
    inventory: Optional[dict] = None
    config: Optional[PruningConfig] = None
    calibration: dict = field(default_factory=dict)
    perplexity: Optional[dict] = None
    accuracy: Optional[dict] = None
    base_model: Optional[str] = None
    library_version: str = __version__
    masks: Optional[dict] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.config is not None and not self.method:
            self.method = self.config.method

    @classmethod
    def from_run(cls, config: PruningConfig, report: "PruningReport", source: Any = None,
                 input_ids: Optional[torch.Tensor] = None, model: Optional[nn.Module] = None) -> "PruningReport":
        """The saved report of a finished `SparsePruner.apply` run: `report` with the config, the calibration actually
        used and the base model."""
        if input_ids is None:  # data-free method: nothing was read, whatever the config names
            source = None
        elif source is None:
            source = config.dataset
        return dataclasses.replace(report, method=config.method, config=config, layers=list(report.layers),
                                   blocks=list(report.blocks), diagnostics=dict(report.diagnostics),
                                   calibration=describe_calibration(source, config, input_ids),
                                   base_model=_hub_id(model))

    @property
    def structure(self) -> Optional[str]:
        return self.config.structure if self.config is not None else None

    @property
    def report(self) -> "PruningReport":
        """The report itself (the name older code used for the engine's half of a record)."""
        return self

    @property
    def mean_sparsity(self) -> float:
        """Fraction of zeros over the pruned matrices: measured on the weights when the run kept an inventory, else
        the size-weighted mean of the per-layer figures."""
        if self.inventory is not None and "sparsity" in self.inventory:
            return self.inventory["sparsity"]
        total = sum(torch.Size(r.shape).numel() for r in self.layers)
        zeros = sum(torch.Size(r.shape).numel() * r.sparsity for r in self.layers)
        return zeros / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {r.name: r.sparsity for r in self.layers}

    def set_perplexity(self, dense: Optional[float], pruned: Optional[float], dataset: str, seq_len: int,
                       windows: Optional[int] = None) -> None:
        """Records dense (before) and pruned (after) perplexity and the evaluation data they were measured on."""
        for name, value in (("dense", dense), ("pruned", pruned)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"Perplexity {name!r} must be a number or None, got {value!r}.")
        if dense is None and pruned is None:
            raise ValueError("record_perplexity needs at least one of `before` (dense) and `after` (pruned).")
        self.perplexity = {"dense": _finite(dense), "pruned": _finite(pruned), "dataset": str(dataset),
                           "seq_len": int(seq_len), "windows": None if windows is None else int(windows)}

    def set_accuracy(self, table: dict) -> None:
        """Records an accuracy table built by `optimum_sparse.eval.accuracy_table`."""
        if not isinstance(table, dict) or not isinstance(table.get("tasks"), dict) or not table["tasks"]:
            raise ValueError(f"An accuracy table needs a non-empty 'tasks' dict, got {table!r}.")
        self.accuracy = _jsonable(table)

    def to_dict(self) -> dict:
        """The saved format; a report without a config (the engine's, before `from_run`) leaves out the run fields."""
        run = {}
        if self.config is not None:
            run = {"format_version": RECORD_FORMAT_VERSION, "library": "optimum-sparse",
                   "library_version": self.library_version}
        run["method"] = self.method
        if self.config is not None:
            run.update(structure=self.structure, target_sparsity=self.config.sparsity)
        run["mean_sparsity"] = self.mean_sparsity
        if self.config is not None:
            run.update(base_model=self.base_model, calibration=self.calibration, perplexity=self.perplexity)
        run["seconds"] = self.seconds
        if self.config is not None:
            run["config"] = self.config.to_dict()
        return _jsonable({
            **run,
            "layers": [r.to_dict() for r in self.layers],
            "blocks": self.blocks,
            **({"allocation": self.allocation} if self.allocation is not None else {}),
            **({"diagnostics": self.diagnostics} if self.diagnostics else {}),
            **({"inventory": self.inventory} if self.inventory is not None else {}),
            **({"accuracy": self.accuracy} if self.accuracy else {}),
        })

    @classmethod
    def from_dict(cls, data: dict) -> "PruningReport":
        if data.get("format_version", 1) > RECORD_FORMAT_VERSION:
            logger.warning("pruning_report.json was written by a newer optimum-sparse (format %s); reading what we "
                           "know.", data.get("format_version"))
        config = PruningConfig.from_dict(data["config"]) if data.get("config") is not None else None
        return cls(method=data.get("method") or (config.method if config is not None else ""), config=config,
                   layers=[LayerReport.from_dict(e) for e in data.get("layers", [])],
                   blocks=list(data.get("blocks", [])), seconds=float(data.get("seconds", 0.0)),
                   diagnostics=dict(data.get("diagnostics") or {}), calibration=dict(data.get("calibration") or {}),
                   perplexity=data.get("perplexity"), base_model=data.get("base_model"),
                   library_version=data.get("library_version", "unknown"), allocation=data.get("allocation"),
                   inventory=data.get("inventory"), accuracy=data.get("accuracy"))


PruningRecord = PruningReport  # the name of the saved side before the two became one class


def _finite(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(value)


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _hub_id(model: Optional[nn.Module]) -> Optional[str]:
    """The model's Hub id when it was loaded from one (not a local path, not built from a config)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name or os.path.exists(name) or os.path.isabs(name) or name.count("/") > 1 or name.startswith("."):
        return None
    return name


def describe_calibration(source: Any, config: PruningConfig, input_ids: Optional[torch.Tensor] = None) -> dict:
    """A JSON description of a calibration source (never the text itself, never a full local path)."""
    if isinstance(source, torch.Tensor):
        text = f"pre-tokenized input_ids tensor {list(source.shape)}"
    elif isinstance(source, str):
        text = f"local file {os.path.basename(source)}" if os.path.isfile(source) else source
    elif isinstance(source, (list, tuple)):
        kind = "texts" if source and isinstance(source[0], str) else "pre-tokenized sequences"
        text = f"{len(source)} custom {kind}"
    elif hasattr(source, "column_names"):
        info = getattr(source, "info", None)
        name = getattr(info, "dataset_name", None) or "datasets.Dataset"
        text = f"{name} ({getattr(source, 'num_rows', '?')} rows)"
    elif source is None:
        text = "none (data-free method)"
    else:
        text = type(source).__name__
    out = {"source": text, "seed": config.seed}
    if input_ids is not None:
        out.update(num_samples=int(input_ids.shape[0]), seq_len=int(input_ids.shape[1]))
    else:
        out.update(num_samples=0, seq_len=0)
    return out
