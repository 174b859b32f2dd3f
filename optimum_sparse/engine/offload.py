"""Blocks offloaded by accelerate: parameters on the meta device, values in the hook's `weights_map`.

A model loaded with a `device_map` that sends blocks to `"cpu"` (with a GPU as main device) or `"disk"`, or built with
`init_empty_weights` + `load_checkpoint_and_dispatch`, has `AlignDevicesHook`s with `offload=True` on its modules:
each forward loads the weights from `hook.weights_map` (CPU tensors, or memory-mapped files in the offload folder)
and drops them afterwards. The engine instead onloads a whole block once (`onload_offloaded_block`), prunes it, and
writes every changed weight back into the offload storage (`update_offloaded_tensor`), so later forwards, evaluation
and `save_pretrained` (which reads offloaded weights from the same `weights_map`) see the pruned values.

Disk-offloaded weights that transformers maps straight to the model's own safetensors checkpoint are never written
in place: the pruned tensor goes to a new `.dat` file in the offload folder (accelerate's `offload_weight`) and the
index entry is repointed to it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import MutableMapping
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["OffloadNotSupportedError", "onload_offloaded_block", "update_offloaded_tensor", "offload_hook"]

logger = logging.getLogger(__name__)


class OffloadNotSupportedError(NotImplementedError):
    """Raised for an offloaded block whose storage the engine cannot write back to."""


def offload_hook(module: nn.Module):
    """The accelerate `AlignDevicesHook` that holds `module`'s offloaded weights, or `None`."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    for h in hooks:
        if isinstance(h, AlignDevicesHook) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def _align_hooks(block: nn.Module) -> list:
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    found = []
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if isinstance(h, AlignDevicesHook):
                found.append((module, h))
    return found


def _offloaded_tensor_names(module: nn.Module, hook) -> list[str]:
    from accelerate.utils import named_module_tensors

    return [name for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                       recurse=hook.place_submodules, remove_non_persistent=True)]


@contextlib.contextmanager
def onload_offloaded_block(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Materialises every offloaded weight of `block` on `device` for the duration of the context.

    While it is open the block's accelerate hooks neither reload nor drop weights (`offload` off) and compute on
    `device`; on exit the weights go back to the meta device and the hooks are restored. Weights changed inside the
    context must be written back with `update_offloaded_tensor` (`optimum_sparse.engine.linears.write_weight` does).
    """
    from accelerate.utils import set_module_tensor_to_device

    hooks = _align_hooks(block)
    saved = [(h, h.offload, h.execution_device) for _, h in hooks]
    onloaded = []
    try:
        for module, hook in hooks:
            hook.execution_device = device
            if hook.offload and hook.weights_map is not None:
                names = _offloaded_tensor_names(module, hook)
                for name in names:
                    set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
                onloaded.append((module, names))
                hook.offload = False
        yield block
    finally:
        for module, names in onloaded:
            for name in names:
                set_module_tensor_to_device(module, name, "meta")
        for hook, offload, device_before in saved:
            hook.offload, hook.execution_device = offload, device_before


@torch.no_grad()
def update_offloaded_tensor(module: nn.Module, name: str, value: torch.Tensor) -> bool:
    """Writes `value` into the offload storage of `module.<name>`; returns `False` when the module is not offloaded.

    CPU storage (a state dict or the loader's `state_dict`) is updated in place; disk storage gets a new memory-mapped
    `.dat` file in the offload folder, through accelerate's `offload_weight`.
    """
    from accelerate.utils import OffloadedWeightsLoader, offload_weight
    from accelerate.utils.offload import PrefixedDataset

    hook = offload_hook(module)
    if hook is None:
        return False
    weights_map = hook.weights_map
    prefix, dataset = (weights_map.prefix, weights_map.dataset) if isinstance(weights_map, PrefixedDataset) else ("", weights_map)
    key = prefix + name
    value = value.detach().to("cpu")
    if isinstance(dataset, OffloadedWeightsLoader):
        if key in dataset.state_dict:
            _store(dataset.state_dict, key, value)
        else:
            if dataset.save_folder is None:
                raise OffloadNotSupportedError(
                    f"{key} is offloaded to disk without an offload folder to write the pruned weight to; load the "
                    "model with `offload_folder=...`."
                )
            offload_weight(value.contiguous(), key, dataset.save_folder, index=dataset.index)
            dataset.all_keys = list(dict.fromkeys([*dataset.all_keys, key]))
    elif isinstance(dataset, MutableMapping):
        _store(dataset, key, value)
    else:
        raise OffloadNotSupportedError(
            f"Cannot write back {key}: offload storage of type {type(dataset).__name__} is not supported."
        )
    return True


def _store(mapping: MutableMapping, key: str, value: torch.Tensor) -> None:
    # replaced, not copied into: the stored tensor may be a read-only memory map of the checkpoint
    current = mapping.get(key)
    mapping[key] = value.to(current.dtype) if isinstance(current, torch.Tensor) else value
