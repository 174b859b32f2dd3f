"""Devices: where a block computes, moving nested inputs, and onloading a block for the duration of its pruning."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["move_to", "module_device", "execution_device", "solve_device", "onload_block", "is_offloaded"]


def move_to(obj: Any, device: torch.device) -> Any:
    """Moves every tensor inside nested tuples/lists/dicts to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


def _hook_execution_device(module: nn.Module) -> Optional[torch.device]:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None and hook is not None and hasattr(hook, "hooks"):  # SequentialHook
        for sub in hook.hooks:
            device = getattr(sub, "execution_device", None) or device
    return torch.device(device) if device is not None else None


def is_offloaded(module: nn.Module) -> bool:
    """True when some parameter of `module` lives on the meta device behind an accelerate offload hook."""
    return any(p.device.type == "meta" for p in module.parameters())


def module_device(module: nn.Module) -> torch.device:
    """The device a module computes on: its accelerate execution device, else the device of its parameters."""
    for m in module.modules():
        device = _hook_execution_device(m)
        if device is not None:
            return device
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def execution_device(model: nn.Module) -> torch.device:
    """Device the model's input ids must be on (the input embedding's device)."""
    embed = model.get_input_embeddings()
    return module_device(embed)


def solve_device(block: nn.Module, requested: Optional[str]) -> torch.device:
    """The device used for a block's forward passes, statistics and solves.

    `requested` wins; otherwise the block's own device, or CUDA when the block sits on the CPU and a GPU exists.
    """
    if requested is not None:
        return torch.device(requested)
    device = module_device(block)
    if device.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return device


@contextlib.contextmanager
def onload_block(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Keeps `block` on `device` while the context is open, then returns it where it was.

    Blocks offloaded by accelerate (parameters on the meta device) are handled by
    `optimum_sparse.engine.offload`; this context moves ordinary blocks only.
    """
    if is_offloaded(block):
        from .offload import onload_offloaded_block

        with onload_offloaded_block(block, device):
            yield block
        return
    original = module_device(block)
    if original == device:
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(original)
