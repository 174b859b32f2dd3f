"""The pruning record (`pruning_report.json`) and the compressed-tensors sparsity sidecar (`sparsity_config.json`)."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch.nn as nn

from ..config import CONFIG_NAME
from ..engine.linears import is_linear
from ..report import PruningRecord, PruningReport, _jsonable, describe_calibration

__all__ = [
    "SPARSITY_CONFIG_NAME", "RECORD_NAME", "PLOT_NAME", "CARD_NAME", "OUR_FILES", "WEIGHT_FILE_PATTERNS",
    "NotAPrunedModelError",
    "PruningRecord", "PruningReport", "describe_calibration", "build_sparsity_config", "checkpoint_sparsity",
]

logger = logging.getLogger(__name__)

SPARSITY_CONFIG_NAME = "sparsity_config.json"
RECORD_NAME = "pruning_report.json"
PLOT_NAME = "sparsity_plot.png"
CARD_NAME = "README.md"
OUR_FILES = (CONFIG_NAME, SPARSITY_CONFIG_NAME, RECORD_NAME, PLOT_NAME, CARD_NAME)
# transformers' weight files: a stale one from an earlier save must not survive next to new ones.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model*.safetensors.index.json", "pytorch_model*.bin",
                        "pytorch_model*.bin.index.json")


class NotAPrunedModelError(ValueError):
    """A folder does not hold a model saved by optimum-sparse."""


# ----- the compressed-tensors sidecar -------------------------------------------------------------------------------
def _linear_classes(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if name and is_linear(m)}


def _targets_and_ignore(record: PruningReport, model: Optional[nn.Module]) -> tuple[list[str], list[str]]:
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


def build_sparsity_config(record: PruningReport, model: Optional[nn.Module] = None,
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
