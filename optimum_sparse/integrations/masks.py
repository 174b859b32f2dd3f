"""Sparsity masks of a pruned model, recovered from its zeros (and cross-checked against a pruning record).

A pruned linear layer stores its mask implicitly: the pruned weights are exactly zero. `recover_masks` reads the
masks back from the weights, detects N:M patterns, and, when a pruning record is available (the
`sparsity_config.json` that `SparsePruner.save_pretrained` writes, a `PruningReport`, or a `{layer: sparsity}`
dict), uses it to decide which layers were pruned and checks that the weights still match it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

__all__ = [
    "SparsityMask", "recover_masks", "mask_from_weight", "detect_structure", "parse_pruning_record",
    "canonical_name", "NotPrunedError",
]

logger = logging.getLogger(__name__)

_SPARSITY_FILE = "sparsity_config.json"
# A record's per-layer sparsity may be a floor-rounded target; allow this much below it.
_RECORD_TOLERANCE = 1e-3


class NotPrunedError(ValueError):
    """Raised when masks are required but the model (or the layers LoRA wraps) holds no pruned layer."""


@dataclass
class SparsityMask:
    """The mask of one pruned layer.

    Attributes:
        keep (`torch.BoolTensor`): `True` where the weight is kept, in the layout of the layer's `weight`
            (`[out, in]` for `nn.Linear`, `[in, out]` for GPT-2's `Conv1D`).
        structure (`str`): `"unstructured"` or the N:M pattern every group of M consecutive inputs satisfies (`"2:4"`).
        sparsity (`float`): fraction of zeros.
    """

    keep: torch.Tensor
    structure: str
    sparsity: float

    def to_dict(self) -> dict:
        return {"structure": self.structure, "sparsity": self.sparsity, "shape": list(self.keep.shape)}


def canonical_name(name: str) -> str:
    """The module name in the plain model: strips peft's `base_model.model.` prefix and `.base_layer` suffix."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    while name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name.replace(".base_layer.", ".")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def detect_structure(keep: torch.Tensor, input_dim: int = 1, candidates: Iterable[int] = (4, 8, 16)) -> str:
    """Returns `"N:M"` when every group of M consecutive inputs has at least N zeros and the layer's sparsity is
    about N/M (within 1%), else `"unstructured"`."""
    pruned = ~keep
    if input_dim != 1:
        pruned = pruned.transpose(0, 1)
    rows, cols = pruned.shape
    sparsity = float(pruned.float().mean()) if pruned.numel() else 0.0
    for m in candidates:
        if cols % m:
            continue
        n = int(pruned.reshape(rows, cols // m, m).sum(-1).min())
        if 0 < n < m and abs(sparsity - n / m) <= 0.01:
            return f"{n}:{m}"
    return "unstructured"


def mask_from_weight(module: nn.Module, structure: Optional[str] = None) -> SparsityMask:
    """The mask of a layer from its zeros (`True` = kept)."""
    weight = module.weight.detach()
    keep = weight != 0
    sparsity = 1.0 - float(keep.float().mean()) if keep.numel() else 0.0
    if structure is None:
        structure = detect_structure(keep, input_dim=0 if _is_conv1d(module) else 1)
    return SparsityMask(keep=keep, structure=structure, sparsity=sparsity)


def parse_pruning_record(record: Any) -> Optional[dict]:
    """Normalizes a pruning record to `{"layers": {name: sparsity}, "structure": str, "masks": dict | None}`.

    Accepts a folder or file holding `sparsity_config.json`, a dict in that format or a plain `{name: sparsity}`
    dict, an `optimum_sparse.serialization.PruningRecord` (its `masks` are used when loaded), a `PruningReport`, a
    `SparsePruner`, or `None` (returns `None`).
    """
    if record is None:
        return None
    if isinstance(record, (str, os.PathLike)):
        path = os.fspath(record)
        if os.path.isdir(path):
            loaded = _load_with_serialization(path)
            if loaded is not None:
                return loaded
            path = os.path.join(path, _SPARSITY_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No pruning record ({_SPARSITY_FILE}) at {os.fspath(record)}.")
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    if hasattr(record, "report") and not isinstance(record, Mapping):  # SparsePruner
        if record.report is None:
            raise ValueError("The SparsePruner passed as a pruning record has not been applied yet (no report).")
        structure = getattr(getattr(record, "config", None), "structure", "unstructured")
        record = record.report
    else:
        structure = None
    if hasattr(record, "layers") and not isinstance(record, Mapping):  # PruningRecord, PruningReport
        structure = structure or getattr(record, "structure", None) or "unstructured"
        return {"layers": {r.name: float(r.sparsity) for r in record.layers}, "structure": str(structure),
                "masks": getattr(record, "masks", None)}
    if isinstance(record, Mapping):
        if "layers" in record and isinstance(record["layers"], Mapping):
            return {"layers": {str(k): float(v) for k, v in record["layers"].items()},
                    "structure": str(record.get("sparsity_structure", record.get("structure", "unstructured"))),
                    "masks": None}
        if all(isinstance(v, (int, float)) for v in record.values()):
            return {"layers": {str(k): float(v) for k, v in record.items()}, "structure": "unstructured", "masks": None}
    raise TypeError(
        "pruning record must be a folder/file with sparsity_config.json, a dict {layer: sparsity}, a PruningReport "
        f"or a SparsePruner; got {type(record).__name__}."
    )


def _load_with_serialization(folder: str) -> Optional[dict]:
    """Uses `optimum_sparse.serialization` when that module provides a record loader; `None` otherwise."""
    try:
        from .. import serialization  # type: ignore[attr-defined]
    except ImportError:
        return None
    loader = getattr(serialization, "load_sparsity_config", None) or getattr(serialization, "load_sparsity_metadata", None)
    if loader is None:
        return None
    try:
        meta = loader(folder)
    except (FileNotFoundError, OSError, ValueError):
        return None
    if isinstance(meta, Mapping) and isinstance(meta.get("layers"), Mapping):
        return {"layers": {str(k): float(v) for k, v in meta["layers"].items()},
                "structure": str(meta.get("sparsity_structure", "unstructured")), "masks": None}
    return None


def recover_masks(
    model: nn.Module,
    record: Any = None,
    min_sparsity: float = 0.05,
    modules: Optional[Mapping[str, nn.Module]] = None,
) -> dict[str, SparsityMask]:
    """Recovers the masks of the pruned linear layers of `model` (a plain model or a peft model).

    The one mask recovery from a live model. Its file-based half is `serialization.load_pruning_record(folder,
    load_masks=True)`, which reads `weight == 0` from the saved safetensors without building the model; when that
    record is passed here, its masks are used and checked against the model's weights.

    Without a record, a linear layer counts as pruned when at least `min_sparsity` of its weights are exactly zero
    (dequantized or dense checkpoints may hold a few incidental zeros; those layers stay dense). With a record, the
    layers it names are the pruned ones, and each must hold at least the recorded fraction of zeros.

    Args:
        model: the pruned model (`PreTrainedModel` or `PeftModel`).
        record: optional pruning record (see `parse_pruning_record`). When it carries masks (a `PruningRecord`
            read with `load_pruning_record(folder, load_masks=True)`), they are used, checked against the weights.
        min_sparsity: the fraction of zeros above which a layer counts as pruned when there is no record.
        modules: restrict the search to these `{name: module}` (names may carry peft prefixes).

    Returns:
        `{canonical layer name: SparsityMask}`, in module order.

    Raises:
        ValueError: a layer named by the record is missing or holds fewer zeros than recorded.
    """
    parsed = parse_pruning_record(record)
    if modules is None:
        modules = {name: m for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) or _is_conv1d(m)}
    search_all = modules is None
    masks: dict[str, SparsityMask] = {}
    found = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.is_meta:
            continue
        cname = canonical_name(name)
        found[cname] = module
        if parsed is not None:
            recorded = parsed["layers"].get(cname)
            if recorded is None or recorded <= 0:
                continue
            structure = parsed["structure"] if parsed["structure"] != "unstructured" else None
            mask = mask_from_weight(module, structure)
            stored = (parsed.get("masks") or {}).get(cname)
            if stored is not None:
                stored_keep = ~stored.to(device=weight.device, dtype=torch.bool)
                if stored_keep.shape != weight.shape:
                    raise ValueError(f"{cname}: the record's mask has shape {tuple(stored.shape)}, the weight "
                                     f"{tuple(weight.shape)}: the record belongs to another model.")
                if (weight.detach()[~stored_keep] != 0).any():
                    raise ValueError(f"{cname}: weights the pruning record marks as pruned are not zero; was the "
                                     "model modified (or densely merged) after pruning?")
                mask = SparsityMask(stored_keep, mask.structure, 1.0 - float(stored_keep.float().mean()))
            if mask.sparsity + _RECORD_TOLERANCE < recorded:
                raise ValueError(
                    f"{cname}: the pruning record says {recorded:.2%} of its weights are zero, the weights hold "
                    f"{mask.sparsity:.2%}. Was the model modified (or densely merged) after pruning, or is this "
                    "another model than the one pruned?"
                )
            masks[cname] = mask
        else:
            zeros = int((weight == 0).sum())
            if zeros < min_sparsity * weight.numel() or zeros == 0:
                continue
            masks[cname] = mask_from_weight(module)
    if parsed is not None and search_all:
        missing = [n for n, s in parsed["layers"].items() if s > 0 and n not in found]
        if missing and len(missing) == len([s for s in parsed["layers"].values() if s > 0]):
            raise ValueError(
                f"None of the {len(missing)} pruned layers of the pruning record exists in the model "
                f"(e.g. {missing[0]!r}): the record belongs to another model."
            )
    return masks
