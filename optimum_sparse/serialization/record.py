"""The pruning record (`pruning_report.json`) and the compressed-tensors sparsity sidecar (`sparsity_config.json`)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import CONFIG_NAME, PruningConfig
from ..engine.block import LayerReport
from ..engine.linears import is_linear
from ..engine.sequential import PruningReport
from ..version import __version__

__all__ = [
    "SPARSITY_CONFIG_NAME", "RECORD_NAME", "PLOT_NAME", "CARD_NAME", "OUR_FILES", "WEIGHT_FILE_PATTERNS",
    "NotAPrunedModelError",
    "PruningRecord", "describe_calibration", "build_sparsity_config", "checkpoint_sparsity",
]

logger = logging.getLogger(__name__)

SPARSITY_CONFIG_NAME = "sparsity_config.json"
RECORD_NAME = "pruning_report.json"
PLOT_NAME = "sparsity_plot.png"
CARD_NAME = "README.md"
RECORD_FORMAT_VERSION = 1
OUR_FILES = (CONFIG_NAME, SPARSITY_CONFIG_NAME, RECORD_NAME, PLOT_NAME, CARD_NAME)
# transformers' weight files: a stale one from an earlier save must not survive next to new ones.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin",
                        "pytorch_model*.bin.index.json")



class NotAPrunedModelError(ValueError):
    """A folder does not hold a model saved by optimum-sparse."""


# ----- the record ---------------------------------------------------------------------------------------------------
@dataclass
class PruningRecord:
    """Everything worth knowing about how a model was pruned; saved as `pruning_report.json` (`RECORD_NAME`).

    The persisted side of a run. The engine returns a `PruningReport` (what the blocks did: layers, blocks, timing,
    inventory, allocation); `PruningRecord.from_run` adds what only the pruner knows (the config, the calibration
    actually used, perplexity/accuracy, base model, version) and is what is saved and loaded. `record.report` gives
    the `PruningReport` back. Two classes because the engine must not depend on the config or the save format.

    Args:
        config (`PruningConfig`): the run's configuration.
        layers (`list[LayerReport]`): per pruned linear: name, shape `[out, in]`, sparsity, relative reconstruction
            error `‖ΔW X‖² / ‖W X‖²` on the calibration inputs (when the method measured it).
        blocks (`list[dict]`): per-block timing and method diagnostics.
        diagnostics (`dict`): run-level method diagnostics (ELSA's training history, a warm start).
        seconds (`float`): pruning wall time.
        calibration (`dict`): the calibration data actually used: `source`, `num_samples`, `seq_len`, `seed`.
        perplexity (`dict`, *optional*): `{"dense", "pruned", "dataset", "seq_len", "windows"}` when measured.
        accuracy (`dict`, *optional*): lm-eval accuracy when measured (`optimum_sparse.eval.accuracy_table`):
            `{"tasks": {task: {"dense", "pruned", "share_of_dense", "version", "items"}}, "num_fewshot", "limit",
            "lm_eval_version"}`.
        base_model (`str`, *optional*): the Hub id of the model that was pruned.
        library_version (`str`): optimum-sparse version that pruned the model.
        allocation (`dict`, *optional*): the layer-wise allocation (`Allocation.to_dict()`) when one was used.
        masks (`dict[str, torch.BoolTensor]`, *optional*): filled by `load_pruning_record`: `True` where the weight is
            zero, by module name, in the layout of the checkpoint's `<name>.weight` tensor.
    """

    config: PruningConfig
    layers: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    seconds: float = 0.0
    diagnostics: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    perplexity: Optional[dict] = None
    base_model: Optional[str] = None
    library_version: str = __version__
    allocation: Optional[dict] = None
    inventory: Optional[dict] = None  # measured sparsity, pruned share, skipped parameters (`PruningReport.inventory`)
    masks: Optional[dict] = field(default=None, repr=False, compare=False)
    accuracy: Optional[dict] = None

    @classmethod
    def from_run(cls, config: PruningConfig, report: PruningReport, source: Any = None,
                 input_ids: Optional[torch.Tensor] = None, model: Optional[nn.Module] = None) -> "PruningRecord":
        """Builds the record of a finished `SparsePruner.apply` run."""
        if input_ids is None:  # data-free method: nothing was read, whatever the config names
            source = None
        elif source is None:
            source = config.dataset
        calibration = describe_calibration(source, config, input_ids)
        return cls(config=config, layers=list(report.layers), blocks=list(report.blocks), seconds=report.seconds,
                   calibration=calibration, base_model=_hub_id(model), allocation=report.allocation,
                   diagnostics=dict(report.diagnostics), inventory=report.inventory)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def structure(self) -> str:
        return self.config.structure

    @property
    def report(self) -> PruningReport:
        return PruningReport(method=self.method, layers=list(self.layers), blocks=list(self.blocks),
                             seconds=self.seconds, allocation=self.allocation,
                             diagnostics=dict(self.diagnostics), inventory=self.inventory)

    @property
    def mean_sparsity(self) -> float:
        """Fraction of zeros over the pruned layers (weighted by size)."""
        return self.report.mean_sparsity

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
        return _jsonable({
            "format_version": RECORD_FORMAT_VERSION,
            "library": "optimum-sparse",
            "library_version": self.library_version,
            "method": self.method,
            "structure": self.structure,
            "target_sparsity": self.config.sparsity,
            "mean_sparsity": self.mean_sparsity,
            "base_model": self.base_model,
            "calibration": self.calibration,
            "perplexity": self.perplexity,
            "seconds": self.seconds,
            "config": self.config.to_dict(),
            "layers": [r.to_dict() for r in self.layers],
            "blocks": self.blocks,
            **({"allocation": self.allocation} if self.allocation is not None else {}),
            **({"diagnostics": self.diagnostics} if self.diagnostics else {}),
            **({"inventory": self.inventory} if self.inventory is not None else {}),
            **({"accuracy": self.accuracy} if self.accuracy else {}),
        })

    @classmethod
    def from_dict(cls, data: dict) -> "PruningRecord":
        if data.get("format_version", 1) > RECORD_FORMAT_VERSION:
            logger.warning("%s was written by a newer optimum-sparse (format %s); reading what we know.",
                           RECORD_NAME, data.get("format_version"))
        layers = []
        for entry in data.get("layers", []):
            entry = dict(entry)
            layers.append(LayerReport(name=entry.pop("name"), shape=tuple(entry.pop("shape")),
                                      sparsity=entry.pop("sparsity"), relative_error=entry.pop("relative_error", None),
                                      extra=entry))
        return cls(config=PruningConfig.from_dict(data["config"]), layers=layers, blocks=list(data.get("blocks", [])),
                   seconds=float(data.get("seconds", 0.0)), diagnostics=dict(data.get("diagnostics") or {}),
                   calibration=dict(data.get("calibration") or {}),
                   perplexity=data.get("perplexity"), base_model=data.get("base_model"),
                   library_version=data.get("library_version", "unknown"), allocation=data.get("allocation"),
                   inventory=data.get("inventory"),
                   accuracy=data.get("accuracy"))


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


# ----- the compressed-tensors sidecar -------------------------------------------------------------------------------
def _linear_classes(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if name and is_linear(m)}


def _targets_and_ignore(record: PruningRecord, model: Optional[nn.Module]) -> tuple[list[str], list[str]]:
    """compressed-tensors `targets`/`ignore`: class names plus exceptions when shorter, else module names."""
    pruned = sorted(r.name for r in record.layers)
    if model is None:
        return pruned, []
    linears = _linear_classes(model)
    classes = sorted({linears[n] for n in pruned if n in linears})
    if not classes or any(n not in linears for n in pruned):
        return pruned, []
    ignore = sorted(n for n, cls in linears.items() if cls in classes and n not in set(pruned))
    return (classes, ignore) if len(classes) + len(ignore) <= len(pruned) else (pruned, [])


def checkpoint_sparsity(folder: str) -> float:
    """Fraction of zeros over every tensor of a saved safetensors checkpoint (tied weights are stored once)."""
    from safetensors import safe_open

    zeros = total = 0
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
    return zeros / total if total else 0.0


def build_sparsity_config(record: PruningRecord, model: Optional[nn.Module] = None,
                          global_sparsity: Optional[float] = None) -> dict:
    """The `sparsity_config.json` sidecar: compressed-tensors key names, plus our per-layer extras.

    `format` is always `"dense"` (the weights are stored dense; compressed-tensors' bitmask formats were removed from
    llm-compressor and vLLM). `global_sparsity` is the fraction of zeros over all parameters of the model, as
    llm-compressor computed it (pass it measured on the checkpoint, see `checkpoint_sparsity`; defaults to the pruned
    layers' fraction); `pruned_sparsity` is the fraction over the pruned layers only. `targets`/`ignore` are class
    names with exceptions when `model` is given and that is shorter, else the pruned modules' names.
    """
    targets, ignore = _targets_and_ignore(record, model)
    if global_sparsity is None:
        global_sparsity = record.mean_sparsity
    return _jsonable({
        "format": "dense",
        "sparsity_structure": record.structure,
        "global_sparsity": global_sparsity,
        "targets": targets,
        "ignore": ignore,
        "library": "optimum-sparse",
        "library_version": record.library_version,
        "method": record.method,
        "pruned_sparsity": record.mean_sparsity,
        "layers": record.layer_sparsity(),
    })
