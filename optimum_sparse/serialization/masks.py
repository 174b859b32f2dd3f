"""Mask recovery: the masks of a pruned model read back from its zeros (a pruned weight is exactly zero).

One core, two sources of weights:

* `ModuleSource`: a live model (plain or peft) — `integrations.recover_masks(model, record)`;
* `CheckpointSource`: the safetensors files of a saved folder, read lazily, no model built —
  `load_pruning_record(folder, load_masks=True)`.

Both resolve a pruned layer's name the same way, mixture-of-experts projections included
(`<experts>.<e>.<projection>`): the slice `e` of the fused parameter `[E, ...]` (stored layout), or, in a checkpoint, the
per-expert tensors transformers saves instead of the fused one. Those names come from transformers' own conversion
table (`transformers.conversion_mapping.get_checkpoint_conversion_mapping(model_type)`): the renamings and the
"merge the experts, concatenate the parts" converters, e.g. Mixtral's legacy
`block_sparse_moe.experts.<e>.w1/w3.weight` (gate, up) -> `mlp.experts.gate_up_proj` and `w2` -> `down_proj`; the split
names `experts.<e>.gate_proj/up_proj/down_proj.weight` are tried for every model type. The same N:M
detection (`detect_structure`) and the same check against the recorded sparsity (`short_of_record`: fewer zeros than
recorded, by more than one weight) apply to both; the live path raises, the file path warns (it has no model to blame).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from ..engine.experts import experts_layout

__all__ = [
    "SparsityMask", "recover_masks", "mask_from_weight", "detect_structure", "parse_pruning_record", "canonical_name",
    "NotPrunedError", "ModuleSource", "CheckpointSource", "read_masks", "short_of_record", "load_masks",
]

_SPARSITY_FILE = "sparsity_config.json"
# Split expert names tried for every model type, after transformers' own entries (source patterns, fused target).
_GENERIC_EXPERT_SPLITS = (
    (("experts.*.gate_proj.weight", "experts.*.up_proj.weight"), "experts.gate_up_proj"),
    (("experts.*.up_proj.weight",), "experts.up_proj"),
    (("experts.*.down_proj.weight",), "experts.down_proj"),
)


class NotPrunedError(ValueError):
    """Raised when masks are required but the model (or the layers LoRA wraps) holds no pruned layer."""


@dataclass
class SparsityMask:
    """The mask of one pruned layer.

    Attributes:
        keep (`torch.BoolTensor`): `True` where the weight is kept, in the layout of the layer's `weight`
            (`[out, in]` for `nn.Linear`, `[in, out]` for GPT-2's `Conv1D`; an expert's slice as stored).
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
    return _mask(module.weight.detach(), 0 if _is_conv1d(module) else 1, structure)


def _mask(weight: torch.Tensor, input_dim: int, structure: Optional[str] = None) -> SparsityMask:
    keep = weight != 0
    sparsity = 1.0 - float(keep.float().mean()) if keep.numel() else 0.0
    if structure is None:
        structure = detect_structure(keep, input_dim=input_dim)
    return SparsityMask(keep=keep, structure=structure, sparsity=sparsity)


def short_of_record(pruned: torch.Tensor, recorded: float) -> bool:
    """Whether the mask `pruned` (`True` = zero) holds fewer zeros than the recorded sparsity, by more than one weight
    (a record's count may be floor-rounded)."""
    numel = pruned.numel()
    return numel > 0 and float(pruned.float().mean()) + 1.0 / numel < recorded


def _split_expert_name(name: str) -> Optional[tuple[str, int, str]]:
    """`(experts module, index, projection)` of `<experts>.<e>.<projection>`, else `None`."""
    head, index, projection = (name.rsplit(".", 2) + ["", ""])[:3]
    return (head, int(index), projection) if index.isdigit() and head else None


# ----- sources ------------------------------------------------------------------------------------------------------
class ModuleSource:
    """The weights of a live model: `{canonical name: module}` (linears and GPT-2 `Conv1D`s with a 2-D weight), and,
    when `model` is given, the experts' fused parameters (`<experts>.<e>.<projection>`: slice `e`)."""

    def __init__(self, modules: Mapping[str, nn.Module], model: Optional[nn.Module] = None):
        self.modules = {}
        for name, module in modules.items():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not weight.is_meta:
                self.modules[canonical_name(name)] = module
        self.model = model
        self._experts: Optional[dict] = None

    def names(self) -> list[str]:
        return list(self.modules)

    def get(self, name: str) -> Optional[tuple[torch.Tensor, int]]:
        """`(weight, input dim)` of layer `name`, or `None` when the model has no such weight."""
        module = self.modules.get(name)
        if module is not None:
            return module.weight.detach(), 0 if _is_conv1d(module) else 1
        parts = _split_expert_name(name) if self.model is not None else None
        if parts is None:
            return None
        if self._experts is None:
            self._experts = {canonical_name(n): m for n, m in self.model.named_modules() if experts_layout(m)}
        head, index, projection = parts
        experts = self._experts.get(head)
        param = getattr(experts, projection, None) if experts is not None else None
        if not isinstance(param, torch.Tensor) or param.dim() != 3 or param.is_meta or index >= param.shape[0]:
            return None
        return param.detach()[index], 0 if experts_layout(experts).transposed else 1


def _pattern(source: str) -> Optional[re.Pattern]:
    """A transformers source pattern (a regex whose `*` stands for the expert index) as a regex capturing it."""
    try:
        return re.compile(source.replace("*", r"(\d+)"))
    except re.error:
        return None


def _conversion_rules(model_type: Optional[str]) -> tuple[list, list]:
    """`(renamings, splits)` from transformers' conversion table for `model_type`: renamings `(regex, replacement)`
    applied to checkpoint keys in order, and splits `([source regex per part], fused target)` for the converters that
    only stack the experts (`MergeModulelist(dim=0)`) and concatenate their parts (`Concatenate(dim=1)`), then the
    generic split names."""
    entries = None
    if model_type:
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            entries = get_checkpoint_conversion_mapping(model_type)
        except ImportError:  # pragma: no cover - transformers < 5
            entries = None
    renamings, splits = [], []
    for entry in entries or ():
        operations = getattr(entry, "operations", None)
        sources, targets = list(entry.source_patterns), list(entry.target_patterns)
        if operations is None:  # WeightRenaming
            for source in sources:
                try:
                    renamings.append((re.compile(source.replace("*", ".*")), targets[0]))
                except re.error:
                    continue
            continue
        ops = [(type(op).__name__, getattr(op, "dim", None)) for op in operations]
        expected = [("MergeModulelist", 0)] + ([("Concatenate", 1)] if len(sources) > 1 else [])
        patterns = [_pattern(s) for s in sources]
        if ops == expected and len(targets) == 1 and all(patterns) and not re.search(r"[\\()\[\]^$]", targets[0]):
            splits.append((patterns, targets[0]))
    splits += [([_pattern(s) for s in sources], target) for sources, target in _GENERIC_EXPERT_SPLITS]
    return renamings, splits


def weight_files(folder: str) -> dict[str, str]:
    """`{tensor name: safetensors file}` for a single-file or sharded checkpoint."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for file in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
        with safe_open(os.path.join(folder, file), "pt") as handle:
            out.update({k: os.path.join(folder, file) for k in handle.keys()})
    return out


class CheckpointSource:
    """The weights of a saved folder, read lazily from its safetensors files (no model built).

    Checkpoint keys are mapped to module names with transformers' conversion table for the folder's `model_type`
    (from its `config.json`, or `model_type=`), so expert projections saved per expert are found under the fused name.
    """

    def __init__(self, folder: str, model_type: Optional[str] = None):
        self.files = weight_files(folder)
        if model_type is None:
            config = os.path.join(folder, "config.json")
            if os.path.isfile(config):
                with open(config, encoding="utf-8") as f:
                    model_type = json.load(f).get("model_type")
        renamings, splits = _conversion_rules(model_type)
        self.keys: dict[str, str] = {}  # module-side name -> checkpoint key
        self.parts: dict[tuple[str, int], dict[int, str]] = {}  # (fused name, expert) -> {part: checkpoint key}
        self.num_parts: dict[str, int] = {}  # fused name -> parts concatenated per expert
        for key in self.files:
            renamed = key
            for regex, replacement in renamings:
                renamed = regex.sub(replacement, renamed)
            self.keys.setdefault(renamed, key)
            self.keys.setdefault(key, key)
            for patterns, target in splits:
                for part, regex in enumerate(patterns):
                    match = regex.search(renamed)
                    if match is not None:
                        fused = renamed[: match.start()] + target + renamed[match.end():]
                        self.parts.setdefault((fused, int(match.group(1))), {})[part] = key
                        self.num_parts[fused] = len(patterns)
                        break

    def names(self) -> list[str]:
        return list(self.keys)

    def _read(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[key], "pt") as handle:
            return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]

    def get(self, name: str) -> Optional[tuple[torch.Tensor, int]]:
        """`(weight, 1)` of layer `name` (an expert's slice in its stored layout), or `None` when not saved."""
        key = self.keys.get(f"{name}.weight")
        if key is not None:
            return self._read(key), 1
        parts = _split_expert_name(name)
        if parts is not None:
            head, index, projection = parts
            fused = f"{head}.{projection}"
            if fused in self.keys:  # saved fused `[E, ...]`
                return self._read(self.keys[fused], index), 1
            found = self.parts.get((fused, index), {})
            if found and len(found) == self.num_parts[fused]:  # saved per expert: parts concatenated as transformers
                return torch.cat([self._read(found[p]) for p in range(len(found))], dim=0), 1
        # checkpoint keys may carry a different prefix than module names
        key = f"{name}.weight"
        candidates = [k for k in self.files if k.endswith("." + key) or key.endswith("." + k)]
        return (self._read(candidates[0]), 1) if len(candidates) == 1 else None


def read_masks(source: Any, names: Iterable[str]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, int]], list]:
    """The core: `({name: (weight, pruned mask, input dim)}, [names without a weight])` for `names` from `source`."""
    found, missing = {}, []
    for name in names:
        got = source.get(name)
        if got is None:
            missing.append(name)
            continue
        weight, input_dim = got
        found[name] = (weight, weight == 0, input_dim)
    return found, missing


# ----- the file path ------------------------------------------------------------------------------------------------
def load_masks(folder: str, record: Any) -> dict[str, torch.Tensor]:
    """`{pruned layer: weight == 0}` from the safetensors files of `folder` for the layers of `record` (a
    `PruningReport`); a layer without a saved weight, or with fewer zeros than recorded, is warned about."""
    found, missing = read_masks(CheckpointSource(folder), [layer.name for layer in record.layers])
    for name in missing:
        warnings.warn(f"No weight for pruned layer {name} in {folder}; its mask is not recovered.")
    masks = {name: pruned for name, (_, pruned, _) in found.items()}
    for layer in record.layers:
        mask = masks.get(layer.name)
        if mask is not None and short_of_record(mask, layer.sparsity):
            warnings.warn(f"{layer.name}: {float(mask.float().mean()):.4f} of the saved weights are zero, fewer than "
                          f"the recorded sparsity {layer.sparsity:.4f} (were the weights changed after pruning?).")
    return masks


# ----- the live path ------------------------------------------------------------------------------------------------
def parse_pruning_record(record: Any) -> Optional[dict]:
    """Normalizes a pruning record to `{"layers": {name: sparsity}, "structure": str, "masks": dict | None}`.

    Accepts a folder or file holding `sparsity_config.json`, a dict in that format or a plain `{name: sparsity}`
    dict, an `optimum_sparse.PruningReport` (its `masks` are used when loaded), a
    `SparsePruner`, or `None` (returns `None`).
    """
    if record is None:
        return None
    if isinstance(record, (str, os.PathLike)):
        path = os.fspath(record)
        if os.path.isdir(path):
            loaded = _load_sidecar(path)
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
    if hasattr(record, "layers") and not isinstance(record, Mapping):  # PruningReport
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


def _load_sidecar(folder: str) -> Optional[dict]:
    """The per-layer sparsity of a saved folder's `sparsity_config.json`; `None` when it has none."""
    from .io import load_sparsity_config

    try:
        meta = load_sparsity_config(folder)
    except (FileNotFoundError, OSError, ValueError):
        return None
    if isinstance(meta, Mapping) and isinstance(meta.get("layers"), Mapping):
        return {"layers": {str(k): float(v) for k, v in meta["layers"].items()},
                "structure": str(meta.get("sparsity_structure", "unstructured")), "masks": None}
    return None


def _checked(name: str, weight: torch.Tensor, mask: SparsityMask, stored: Optional[torch.Tensor]) -> SparsityMask:
    """`mask`, or the record's stored mask once checked against the weights (every marked weight zero)."""
    if stored is None:
        return mask
    stored_keep = ~stored.to(device=weight.device, dtype=torch.bool)
    if stored_keep.shape != weight.shape:
        raise ValueError(f"{name}: the record's mask has shape {tuple(stored.shape)}, the weight "
                         f"{tuple(weight.shape)}: the record belongs to another model.")
    if (weight[~stored_keep] != 0).any():
        raise ValueError(f"{name}: weights the pruning record marks as pruned are not zero; was the "
                         "model modified (or densely merged) after pruning?")
    return SparsityMask(stored_keep, mask.structure, 1.0 - float(stored_keep.float().mean()))


def recover_masks(
    model: nn.Module,
    record: Any = None,
    min_sparsity: float = 0.05,
    modules: Optional[Mapping[str, nn.Module]] = None,
) -> dict[str, SparsityMask]:
    """Recovers the masks of the pruned layers of `model` (a plain model or a peft model).

    Without a record, a linear layer counts as pruned when at least `min_sparsity` of its weights are exactly zero
    (dequantized or dense checkpoints may hold a few incidental zeros; those layers stay dense). With a record, the
    layers it names are the pruned ones (experts' slices of fused parameters included), and each must hold the
    recorded fraction of zeros (`short_of_record`).

    Args:
        model: the pruned model (`PreTrainedModel` or `PeftModel`).
        record: optional pruning record (see `parse_pruning_record`). When it carries masks (a `PruningReport`
            read with `load_pruning_record(folder, load_masks=True)`), they are used, checked against the weights.
        min_sparsity: the fraction of zeros above which a layer counts as pruned when there is no record.
        modules: restrict the search to these `{name: module}` (names may carry peft prefixes).

    Returns:
        `{canonical layer name: SparsityMask}`, in module order (experts' slices after the modules).

    Raises:
        ValueError: a layer named by the record holds fewer zeros than recorded, or none of its layers exists.
    """
    parsed = parse_pruning_record(record)
    search_all = modules is None
    if modules is None:
        modules = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
    source = ModuleSource(modules, model if search_all else None)
    if parsed is None:
        masks = {}
        for name, (weight, pruned, input_dim) in read_masks(source, source.names())[0].items():
            zeros = int(pruned.sum())
            if zeros and zeros >= min_sparsity * weight.numel():
                masks[name] = _mask(weight, input_dim)
        return masks
    wanted = {n: s for n, s in parsed["layers"].items() if s > 0}
    order = [n for n in source.names() if n in wanted] + [n for n in wanted if n not in source.modules]
    found, missing = read_masks(source, order)
    if search_all and wanted and len(missing) == len(wanted):
        raise ValueError(f"None of the {len(missing)} pruned layers of the pruning record exists in the model "
                         f"(e.g. {missing[0]!r}): the record belongs to another model.")
    structure = parsed["structure"] if parsed["structure"] != "unstructured" else None
    stored_masks = parsed.get("masks") or {}
    masks = {}
    for name, (weight, pruned, input_dim) in found.items():
        mask = _checked(name, weight, _mask(weight, input_dim, structure), stored_masks.get(name))
        if short_of_record(~mask.keep, wanted[name]):
            raise ValueError(
                f"{name}: the pruning record says {wanted[name]:.2%} of its weights are zero, the weights hold "
                f"{mask.sparsity:.2%}. Was the model modified (or densely merged) after pruning, or is this "
                "another model than the one pruned?"
            )
        masks[name] = mask
    return masks

