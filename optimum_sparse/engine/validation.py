"""Checks that run before the first weight changes: model kind, device, and every weight the run will prune.

`validate_run` is called by `SparsePruner.apply` once the targets are known. It iterates whatever
`(full name, tensor)` targets it is given (linear weights, expert weight stacks, ...), so new kinds of targets are
checked without changes here. Offloaded weights (accelerate hooks, parameters on the meta device) are read from their
offload storage.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..errors import (
    DeviceUnavailableError, MetaTensorError, NonFiniteWeightError, QuantizedWeightError, UnsupportedModelError,
)
from .experts import ExpertLinear
from .offload import offload_hook

__all__ = [
    "check_model_kind", "check_device", "check_quantization", "check_weights", "linear_targets", "stored_tensor", "stored_weight",
    "validate_run",
]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_QUANTIZED_CLASSES = ("Linear8bitLt", "Linear4bit", "QuantLinear", "WQLinear", "QLinear", "FP8Linear", "MarlinQuantLinear")
_HINT = ("pruning rewrites dense weights: load the unquantized checkpoint (float32/bfloat16/float16), prune it, then "
         "quantize the pruned model")


def check_model_kind(model: nn.Module, blocks: Optional[nn.ModuleList] = None) -> None:
    """Refuses models that are not causal decoders, from the model's own flags.

    Encoder-decoder models (`config.is_encoder_decoder`: T5, BART, Whisper) and encoders (every self-attention module
    of the blocks has `is_causal=False`: BERT, RoBERTa, DistilBERT, or a BERT `LMHeadModel` without `is_decoder`) raise
    `UnsupportedModelError`. Models whose attention modules carry no `is_causal` flag are taken as decoders.
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; optimum-sparse prunes causal decoders (AutoModelForCausalLM: Llama, "
            "Qwen, Mistral, Gemma, Phi-3, OPT, GPT-2, GPT-NeoX, Falcon, ...). Only the encoder would be found and "
            "pruned, so nothing was changed."
        )
    flags = [m.is_causal for m in (blocks if blocks is not None else model).modules()
             if isinstance(getattr(m, "is_causal", None), bool)]
    if flags and not any(flags):
        raise UnsupportedModelError(
            f"{name} is a bidirectional encoder (its attention is not causal); optimum-sparse prunes causal decoders "
            "(AutoModelForCausalLM). Nothing was changed."
        )


def check_device(device: Optional[str]) -> None:
    """Raises `DeviceUnavailableError` when `device` (e.g. `"cuda"`, `"cuda:3"`, `"mps"`) does not exist here."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cpu" or dev.type == "meta":
        if dev.type == "meta":
            raise DeviceUnavailableError("PruningConfig.device='meta' cannot compute; use 'cuda', 'cpu' or None.")
        return
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    count = backend.device_count() if available and hasattr(backend, "device_count") else (1 if available else 0)
    if not available or (dev.index is not None and dev.index >= count):
        found = f"{count} {dev.type} device(s)" if available else f"no {dev.type} device"
        raise DeviceUnavailableError(
            f"PruningConfig.device={device!r}, but this machine has {found} (torch {torch.__version__}). Use "
            f"device=None (each block's own device, CUDA when present), 'cpu', or an existing index."
        )


def stored_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The value of `module.<name>`: the parameter itself, or its offload storage when it sits on the meta device.

    Raises `MetaTensorError` for a meta tensor with no offload storage.
    """
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    hook = offload_hook(module)
    if hook is not None:
        try:
            return hook.weights_map[name]
        except KeyError:
            pass
    raise MetaTensorError(
        f"has its {name} on the meta device with no offload storage (a model built with init_empty_weights and "
        "never loaded); load the weights (from_pretrained, or load_checkpoint_and_dispatch) before pruning."
    )


def stored_weight(module) -> torch.Tensor:
    """The stored `[out, in]`-or-layout weight of a target: a linear's `weight`, or an expert's slice of its fused
    parameter (offloaded ones read from their storage)."""
    if isinstance(module, ExpertLinear):
        try:
            return stored_tensor(module.experts, module.projection)[module.index]
        except MetaTensorError as err:
            raise MetaTensorError(f"expert {module.index} of {module.experts.__class__.__name__} {err}") from None
    return stored_tensor(module)


def linear_targets(model: nn.Module, blocks_path: str, targets: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """`(full weight name, stored tensor)` of every target linear, from `check_targets`' per-block dicts."""
    pairs = []
    for index, linears in enumerate(targets):
        for name, module in linears.items():
            full = f"{blocks_path}.{index}.{name}"
            try:
                pairs.append((full if isinstance(module, ExpertLinear) else f"{full}.weight", stored_weight(module)))
            except MetaTensorError as err:
                raise MetaTensorError(f"{full} {err}") from None
    return pairs


def check_quantization(model: nn.Module, modules: Optional[Iterable[tuple[str, nn.Module]]] = None) -> None:
    """Refuses quantized models (transformers `quantization_config`, bitsandbytes/GPTQ/AWQ modules)."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None or getattr(model, "is_quantized", False):
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise QuantizedWeightError(
            f"{type(model).__name__} is quantized (quantization_config{f': {method}' if method else ''}); {_HINT}."
        )
    for name, module in modules if modules is not None else model.named_modules():
        cls = type(module).__name__
        if cls in _QUANTIZED_CLASSES or hasattr(module, "qweight"):
            raise QuantizedWeightError(f"{name} is a quantized layer ({cls}); {_HINT}.")


def check_weights(targets: Iterable[tuple[str, torch.Tensor]], others: Iterable[tuple[str, torch.Tensor]] = ()) -> int:
    """Checks every target tensor: a float dtype the solvers handle, and finite values. Returns the number checked.

    `others` (e.g. the norms and embeddings the calibration forward uses) are checked for finiteness only.

    Raises:
        `QuantizedWeightError` for an integer, fp8 or packed dtype; `NonFiniteWeightError` for NaN/inf values.
    """
    count = 0
    for name, tensor in targets:
        if tensor.dtype not in _FLOAT_DTYPES:
            kind = "integer" if not tensor.dtype.is_floating_point else "low-precision (fp8)"
            raise QuantizedWeightError(f"{name} has {kind} dtype {tensor.dtype}; {_HINT}.")
        _check_finite(name, tensor, "would be pruned", True)
        count += 1
    for name, tensor in others:
        if tensor.dtype.is_floating_point:
            _check_finite(name, tensor, "is used by the calibration forward passes", False)
    return count


def _check_finite(name: str, tensor: torch.Tensor, role: str, target: bool) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        nan = int(torch.isnan(tensor).sum())
        raise NonFiniteWeightError(
            f"{name} {role} but holds {bad} non-finite value(s) ({nan} NaN, {bad - nan} inf) of {tensor.numel()}; "
            "nothing was changed. Reload the checkpoint (a corrupted file or an overflowed fine-tune)"
            + (" or add the layer to `ignore`." if target else ".")
        )


def _other_tensors(model: nn.Module, blocks: nn.ModuleList, blocks_path: str, skip: set) -> list[tuple[str, torch.Tensor]]:
    """Non-target parameters of the blocks (norms, biases, routers) and the input embedding."""
    pairs = []
    for index, block in enumerate(blocks):
        for mname, module in block.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                full = f"{blocks_path}.{index}.{mname}.{pname}" if mname else f"{blocks_path}.{index}.{pname}"
                if full in skip:
                    continue
                try:
                    pairs.append((full, stored_tensor(module, pname)))
                except MetaTensorError:
                    continue  # not a target: the forward pass reports it if it is really missing
    embed = model.get_input_embeddings()
    if embed is not None and getattr(embed, "weight", None) is not None and embed.weight.device.type != "meta":
        pairs.append(("input embeddings", embed.weight))
    return pairs


@torch.no_grad()
def validate_run(model: nn.Module, config, blocks: nn.ModuleList, blocks_path: str,
                 targets: list[tuple[str, torch.Tensor]]) -> None:
    """Every check that must pass before the first weight changes (see the module docstring).

    Args:
        model: the model to prune.
        config: its `PruningConfig` (`device` is checked).
        blocks: the decoder blocks.
        blocks_path: their dotted path (e.g. `"model.layers"`).
        targets: `(full name, tensor)` of every weight the run will prune.
    """
    check_model_kind(model, blocks)
    check_device(config.device)
    check_quantization(model, ((f"{blocks_path}.{i}.{n}", m) for i, b in enumerate(blocks) for n, m in b.named_modules()))
    checked = check_weights(targets, _other_tensors(model, blocks, blocks_path, {name for name, _ in targets}))
    logger.debug("Checked %d target weights before pruning.", checked)
