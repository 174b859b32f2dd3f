"""LoRA on pruned models that stays sparse: masked training, masked merge, checked adapter loading.

peft's own merge writes `W + ΔW` and fills every pruned weight back in. Here:

* `mask_lora_updates(peft_model)` recovers each pruned layer's mask `M` (from its zeros, or a pruning record) and
  installs `MaskedLoraVariant` (a peft `LoraVariant`) on the LoRA layers that wrap pruned linears: their update is
  `(B @ A · scaling) ⊙ M` in the forward pass, in training and inference alike, and in peft's `merge_adapter`,
  `unmerge_adapter` and `merge_and_unload`. The adapter's saved weights (`lora_A`, `lora_B`) are peft's usual ones.
* `merge_and_unload_sparse(peft_model)` merges `(W + ΔW) ⊙ M` and returns the base model: every pruned weight is
  exactly `+0.0` afterwards, whether or not the adapter was trained with masking (without it, the part of the update
  that fell on pruned weights is dropped, so the merged model differs a little from the adapter model).
* `load_sparse_adapter(base, path)` checks a saved adapter against the base (module names and shapes) before peft
  loads it, then masks it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masks import NotPrunedError, SparsityMask, canonical_name, recover_masks

try:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer, LoraModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraVariant
    from peft.utils.other import transpose
except ImportError as _err:  # pragma: no cover - peft is a hard requirement of this module
    raise ImportError("optimum_sparse.integrations.peft needs peft: pip install peft") from _err

__all__ = [
    "MaskedLoraVariant", "MaskedLoraLinear", "AdapterMismatchError", "mask_lora_updates", "unmask_lora_updates", "merge_and_unload_sparse",
    "check_adapter_compatible", "load_sparse_adapter", "lora_layers", "is_masked",
]

logger = logging.getLogger(__name__)

MASK_BUFFER = "sparse_lora_pruned"


class AdapterMismatchError(ValueError):
    """Raised when an adapter does not fit the base model (module names or shapes differ)."""


# ----- the peft variant ----------------------------------------------------------------------------------------
def _pruned(module: nn.Module) -> torch.Tensor:
    """The layer's mask, `True` where the base weight is pruned (base weight layout)."""
    pruned = getattr(module, MASK_BUFFER, None)
    if pruned is None:
        raise RuntimeError(f"{type(module).__name__} has a masked LoRA adapter but no mask; call mask_lora_updates again.")
    return pruned


def _masked_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """`(B @ A · scaling) ⊙ M` in the layout of the base weight (differentiable).

    Same value as peft's `get_delta_weight` masked, with the scaling applied to the small factor `B` and one pass over
    the `[out, in]` matrix after the product (this runs in every forward pass).
    """
    weight_a = module.lora_A[adapter].weight
    weight_b = module.lora_B[adapter].weight
    if weight_b.device.type == "cpu" and weight_b.dtype in (torch.float16, torch.bfloat16):  # as peft: slow CPU half matmuls
        delta = ((weight_b.float() * module.scaling[adapter]) @ weight_a.float()).to(weight_b.dtype)
    else:
        delta = (weight_b * module.scaling[adapter]) @ weight_a
    delta = transpose(delta, module.fan_in_fan_out)
    return delta.masked_fill(_pruned(module).to(delta.device), 0.0)


class MaskedLoraVariant(LoraVariant):
    """A peft `LoraVariant` whose update is masked by the sparsity mask of the wrapped (pruned) layer.

    The mask lives in the LoRA layer as the non-persistent buffer `sparse_lora_pruned` (`True` = pruned weight, the
    base weight's layout), so it follows `.to(device)` and never enters the saved adapter. Forward computes
    `result + dropout(x) @ ((B @ A · scaling) ⊙ M)ᵀ (+ lora bias)`; merges write `(W + ΔW ⊙ M)` with the pruned
    entries set to `+0.0`.
    """

    def supports_lora_conversion(self) -> bool:
        return True

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:  # the mask is installed by mask_lora_updates
        return None

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = _masked_delta(module, active_adapter).detach()
        merged = orig_weight + delta.to(orig_weight.dtype)
        return merged.masked_fill_(_pruned(module).to(merged.device), 0.0)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        delta = _masked_delta(module, active_adapter).detach()
        orig_weight.data.add_(delta.to(orig_weight.dtype))
        orig_weight.data.masked_fill_(_pruned(module).to(orig_weight.device), 0.0)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = _masked_delta(module, active_adapter).detach()
        weight = orig_weight.data - delta.to(orig_weight.dtype)
        return weight.masked_fill_(_pruned(module).to(weight.device), 0.0)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_b = module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        weight = transpose(_masked_delta(module, active_adapter), module.fan_in_fan_out)  # [out, in]
        x = module.lora_dropout[active_adapter](x)
        bias = lora_b.bias * scaling if getattr(lora_b, "bias", None) is not None else None
        update = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return result + update.to(result.dtype)


class MaskedLoraLinear(LoraLinear):
    """peft's `lora.Linear` with a fused forward for masked adapters: `x @ (W + Σ ΔWₐ ⊙ M)ᵀ + b` in one matmul.

    `mask_lora_updates` switches the class of plain `lora.Linear` layers over `nn.Linear`/`Conv1D` bases to this one
    (state dict, saving and peft's merges are unchanged: they go through `MaskedLoraVariant`). The fused path does
    the work of one linear layer forward and two backward, instead of two forward and three backward for the
    variant's separate update path; it runs when the adapters are active and unmerged, every active adapter is
    masked, and no dropout is live. Anything else (dropout in training, mixed-adapter batches, disabled or merged
    adapters) goes through peft's own forward, i.e. `MaskedLoraVariant.forward`.
    """

    def _fused_adapters(self, args: tuple, kwargs: dict) -> Optional[list[str]]:
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        base = self.get_base_layer()
        if not (type(base).forward is nn.Linear.forward or type(base).__name__ == "Conv1D"):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        for adapter in active:
            if not isinstance(self.lora_variant.get(adapter), MaskedLoraVariant):
                return None
            dropout = self.lora_dropout[adapter]
            if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
                return None
        return active

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._fused_adapters(args, kwargs)
        if active is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        for adapter in active:  # in the base weight's layout
            weight = weight + _masked_delta(self, adapter).to(weight.dtype)
            lora_b = self.lora_B[adapter]
            if getattr(lora_b, "bias", None) is not None:
                extra = (lora_b.bias * self.scaling[adapter]).to(weight.dtype)
                bias = extra if bias is None else bias + extra
        return F.linear(x.to(weight.dtype), transpose(weight, self.fan_in_fan_out), bias)

    def __repr__(self) -> str:
        return "masked_" + super().__repr__()


# ----- helpers -------------------------------------------------------------------------------------------------
def _check_peft_model(peft_model: Any) -> None:
    if not isinstance(peft_model, (PeftModel, LoraModel)):
        raise TypeError(
            "Expected a peft model with LoRA adapters (from peft.get_peft_model or PeftModel.from_pretrained), got "
            f"{type(peft_model).__name__}. For a plain pruned model, wrap it first: get_peft_model(model, LoraConfig(...))."
        )
    configs = getattr(peft_model, "peft_config", {}) or {}
    others = {name: str(getattr(c, "peft_type", "?")) for name, c in configs.items()
              if str(getattr(getattr(c, "peft_type", None), "value", getattr(c, "peft_type", ""))) != "LORA"}
    if others:
        raise TypeError(f"Only LoRA adapters are supported; adapters {others} use another PEFT method.")


def lora_layers(peft_model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers of a peft model, `{module name: layer}`."""
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def is_masked(layer: nn.Module, adapter_name: str = "default") -> bool:
    """True when `adapter_name` of this LoRA layer uses `MaskedLoraVariant`."""
    return isinstance(getattr(layer, "lora_variant", {}).get(adapter_name), MaskedLoraVariant)


def _base_in_out(base: nn.Module) -> tuple[int, int]:
    w = base.weight
    return (w.shape[0], w.shape[1]) if type(base).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def _check_layer_shapes(name: str, layer: LoraLayer) -> None:
    base = layer.get_base_layer()
    if not hasattr(base, "weight") or getattr(base.weight, "dim", lambda: 0)() != 2:
        return
    fan_in, fan_out = _base_in_out(base)
    for adapter, lora_a in layer.lora_A.items():
        a_in = lora_a.weight.shape[1]
        b_out = layer.lora_B[adapter].weight.shape[0]
        if (a_in, b_out) != (fan_in, fan_out):
            raise AdapterMismatchError(
                f"{canonical_name(name)}: adapter {adapter!r} maps {a_in} -> {b_out} features but the base layer "
                f"maps {fan_in} -> {fan_out}: the adapter was trained for another base model."
            )


def _unmerge_all(layers: dict[str, LoraLayer]) -> None:
    """Unmerges merged adapters (a plain peft merge of a pruned layer unmerges back to exact zeros: 0 + d - d = 0)."""
    for layer in layers.values():
        if getattr(layer, "merged", False):
            logger.info("Unmerging adapters %s before recovering the sparsity masks.", list(layer.merged_adapters))
            layer.unmerge()


def mask_lora_updates(
    peft_model: nn.Module,
    record: Any = None,
    adapter_names: Optional[list[str]] = None,
    min_sparsity: float = 0.05,
    require_pruned: bool = True,
) -> dict[str, SparsityMask]:
    """Masks the LoRA updates of a pruned model so that the adapter only ever changes kept weights.

    After this call, every LoRA layer wrapping a pruned linear computes `(B @ A · scaling) ⊙ M` instead of
    `B @ A · scaling`, during training (gradients flow only through kept entries) and inference, and peft's merges
    keep the pruned weights at zero; the merged model then computes exactly what the adapter model computes. Call
    it once after `get_peft_model` (before training) and again after `PeftModel.from_pretrained` (masks are recovered
    from the base weights, never stored in the adapter). Works with the transformers `Trainer` and plain loops.

    Note: a masked update is materialized as a dense `[out, in]` matrix per layer in the forward pass and kept for
    backward. Plain `lora.Linear` layers switch to `MaskedLoraLinear`, which folds it into the base weight (one
    matmul per layer); training then costs about 1.5x a plain LoRA step in the linear layers.

    Args:
        peft_model: a `PeftModel` (or `LoraModel`) with LoRA adapters on a pruned base model.
        record: optional pruning record (folder with `sparsity_config.json`, dict, `PruningReport`, `SparsePruner`);
            without one, masks come from the zeros of each wrapped layer.
        adapter_names: adapters to mask (default: all LoRA adapters of each layer).
        min_sparsity: fraction of zeros above which a layer counts as pruned (no record).
        require_pruned: raise `NotPrunedError` when no LoRA-wrapped layer is pruned.

    Returns:
        `{layer name: SparsityMask}` for the masked layers.

    Raises:
        TypeError: not a peft LoRA model, or an adapter uses another LoRA variant (DoRA, ...) on a pruned layer.
        AdapterMismatchError: an adapter's shapes differ from the base layer's.
        NotPrunedError: no LoRA-wrapped layer is pruned (and `require_pruned`).
    """
    _check_peft_model(peft_model)
    layers = lora_layers(peft_model)
    if not layers:
        raise ValueError("The peft model has no LoRA layer; check LoraConfig.target_modules.")
    for name, layer in layers.items():
        _check_layer_shapes(name, layer)
    _unmerge_all(layers)
    bases = {name: layer.get_base_layer() for name, layer in layers.items()}
    masks = recover_masks(peft_model, record=record, min_sparsity=min_sparsity, modules=bases)
    if not masks and require_pruned:
        raise NotPrunedError(
            f"None of the {len(layers)} layers wrapped by LoRA is pruned (no layer has >= {min_sparsity:.0%} exact "
            "zeros): pass the pruned model (SparsePruner.apply or a folder saved after pruning), or use peft's plain "
            "merge_and_unload for a dense model."
        )
    for name, layer in layers.items():
        mask = masks.get(canonical_name(name))
        if mask is None:
            continue
        if not isinstance(layer, LoraLinear):
            raise TypeError(
                f"{canonical_name(name)} is pruned but wrapped by {type(layer).__name__}; masked LoRA supports "
                "peft's lora.Linear (nn.Linear / Conv1D bases) only."
            )
        wanted = adapter_names if adapter_names is not None else list(layer.lora_A.keys())
        for adapter in wanted:
            if adapter not in layer.lora_A:
                continue
            current = layer.lora_variant.get(adapter)
            if current is not None and not isinstance(current, MaskedLoraVariant):
                raise TypeError(
                    f"{canonical_name(name)}: adapter {adapter!r} uses {type(current).__name__}; masked LoRA supports "
                    "plain LoRA adapters (use_dora=False and no other LoRA variant)."
                )
            layer.lora_variant[adapter] = MaskedLoraVariant()
        if type(layer) is LoraLinear:
            layer.__class__ = MaskedLoraLinear
        layer.register_buffer(MASK_BUFFER, ~mask.keep.to(layer.get_base_layer().weight.device), persistent=False)
    logger.info("Masked the LoRA updates of %d pruned layers.", len(masks))
    return masks


def unmask_lora_updates(peft_model: nn.Module) -> None:
    """Undoes `mask_lora_updates` (plain LoRA updates again). Merged adapters are unmerged first."""
    _check_peft_model(peft_model)
    layers = lora_layers(peft_model)
    _unmerge_all(layers)
    for layer in layers.values():
        for adapter in [a for a, v in layer.lora_variant.items() if isinstance(v, MaskedLoraVariant)]:
            del layer.lora_variant[adapter]
        if MASK_BUFFER in layer._buffers:
            del layer._buffers[MASK_BUFFER]
        if type(layer) is MaskedLoraLinear:
            layer.__class__ = LoraLinear


def merge_and_unload_sparse(
    peft_model: nn.Module,
    record: Any = None,
    adapter_names: Optional[list[str]] = None,
    safe_merge: bool = False,
    progressbar: bool = False,
    min_sparsity: float = 0.05,
    require_pruned: bool = True,
) -> nn.Module:
    """Merges LoRA adapters into a pruned model as `(W + ΔW) ⊙ M` and returns the base model, still sparse.

    Every pruned weight of every LoRA-wrapped pruned layer is exactly `+0.0` afterwards and each layer's sparsity is
    unchanged (checked). If the adapter was trained after `mask_lora_updates`, the merged model computes exactly what
    the adapter model computed; otherwise the part of the update that fell on pruned weights is dropped.

    Args:
        peft_model: a `PeftModel` (or `LoraModel`) with LoRA adapters on a pruned base model.
        record: optional pruning record (see `mask_lora_updates`).
        adapter_names: adapters to merge (default: the active ones, as in peft).
        safe_merge: merge into a copy and check for NaNs first (peft's `safe_merge`).
        progressbar: show peft's progress bar.
        min_sparsity: fraction of zeros above which a layer counts as pruned (no record).
        require_pruned: raise `NotPrunedError` when no LoRA-wrapped layer is pruned.

    Returns:
        The base model (`PreTrainedModel`) with the adapters merged and the LoRA layers removed.

    Raises:
        TypeError, AdapterMismatchError, NotPrunedError: as `mask_lora_updates`.
        RuntimeError: a pruned weight would not be zero after the merge (never expected) or NaNs were produced.
    """
    masks = mask_lora_updates(peft_model, record=record, min_sparsity=min_sparsity, require_pruned=require_pruned)
    merged = peft_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
    bad = []
    for name, mask in masks.items():
        weight = merged.get_submodule(name).weight.detach()
        pruned = weight[~mask.keep.to(weight.device)]
        if pruned.numel() and (pruned.ne(0).any() or torch.signbit(pruned).any()):
            bad.append(name)
        if not torch.isfinite(weight).all():
            raise RuntimeError(f"{name}: the merged weights are not finite; the adapter is broken.")
    if bad:  # pragma: no cover - guarded by MaskedLoraVariant
        raise RuntimeError(f"Pruned weights are not +0.0 after the merge in {bad[:3]}.")
    logger.info("Merged LoRA into %d pruned layers; every pruned weight is +0.0.", len(masks))
    return merged


# ----- loading saved adapters ----------------------------------------------------------------------------------
def _adapter_files(adapter: Union[str, os.PathLike], **hub_kwargs) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The adapter config and `{key: shape}` of a saved adapter (local folder or Hub id)."""
    path = os.fspath(adapter)
    names = ("adapter_model.safetensors", "adapter_model.bin")
    if os.path.isdir(path):
        config_file = os.path.join(path, "adapter_config.json")
        weight_file = next((os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))), None)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"No adapter_config.json in {path}: not a saved peft adapter.")
    else:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(path, "adapter_config.json", **hub_kwargs)
        weight_file = hf_hub_download(path, names[0], **hub_kwargs)
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if weight_file is None:
        raise FileNotFoundError(f"No adapter weights ({' or '.join(names)}) in {path}.")
    if weight_file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weight_file, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        state = torch.load(weight_file, map_location="cpu", weights_only=True)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    return config, shapes


def check_adapter_compatible(base_model: nn.Module, adapter: Union[str, os.PathLike], **hub_kwargs) -> None:
    """Checks that a saved LoRA adapter fits `base_model`: every adapted module exists and has matching shapes.

    Raises:
        AdapterMismatchError: naming the first mismatching modules, the adapter's base model and this one's.
    """
    config, shapes = _adapter_files(adapter, **hub_kwargs)
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterMismatchError(f"{os.fspath(adapter)} is a {peft_type} adapter; only LoRA adapters are supported.")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    problems = []
    for key, shape in sorted(shapes.items()):
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                break
        else:
            continue
        module_name = canonical_name(key.split(part)[0])
        try:
            module = base_model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"{module_name}: no such module in the base model")
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or len(shape) != 2:
            continue
        fan_in, fan_out = (weight.shape[0], weight.shape[1]) if (type(module).__name__ == "Conv1D" or fan_in_fan_out) \
            else (weight.shape[1], weight.shape[0])
        if isinstance(module, nn.Embedding):
            fan_in, fan_out = weight.shape[0], weight.shape[1]
        if part == ".lora_A." and shape[1] != fan_in:
            problems.append(f"{module_name}: adapter input size {shape[1]}, base layer {fan_in}")
        elif part == ".lora_B." and shape[0] != fan_out:
            problems.append(f"{module_name}: adapter output size {shape[0]}, base layer {fan_out}")
    if problems:
        theirs = config.get("base_model_name_or_path") or "unknown"
        ours = getattr(getattr(base_model, "config", None), "name_or_path", "") or type(base_model).__name__
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterMismatchError(
            f"The adapter at {os.fspath(adapter)} does not fit this base model ({ours}); it was trained on {theirs}: "
            + "; ".join(problems[:3]) + more + "."
        )


def load_sparse_adapter(
    base_model: nn.Module,
    adapter: Union[str, os.PathLike],
    adapter_name: str = "default",
    is_trainable: bool = False,
    record: Any = None,
    mask: bool = True,
    **kwargs,
):
    """Loads a saved LoRA adapter onto a pruned base model with clear errors, then masks its updates.

    Equivalent to `PeftModel.from_pretrained(base_model, adapter, ...)` followed by `mask_lora_updates`, with
    `check_adapter_compatible` first.

    Args:
        base_model: the pruned base model.
        adapter: folder (or Hub id) of an adapter saved by peft's `save_pretrained`.
        adapter_name, is_trainable: as in `PeftModel.from_pretrained`.
        record: optional pruning record for `mask_lora_updates`.
        mask: call `mask_lora_updates` (default); set False to load a plain peft model.
        kwargs: passed to `PeftModel.from_pretrained`.

    Raises:
        AdapterMismatchError: the adapter was trained for another base model.
        NotPrunedError: `mask` and the base model holds no pruned layer under the adapter.
    """
    check_adapter_compatible(base_model, adapter)
    try:
        model = PeftModel.from_pretrained(base_model, adapter, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    except RuntimeError as err:
        if "size mismatch" in str(err):
            raise AdapterMismatchError(f"The adapter at {os.fspath(adapter)} does not fit this base model: {err}") from err
        raise
    if mask:
        mask_lora_updates(model, record=record)
    return model


__all__ += ["NotPrunedError"]
