"""Blocks offloaded by accelerate (parameters on the meta device, values in the hook's weights map).

Pruning such blocks needs onloading through accelerate's hooks and writing the pruned weights back to the CPU or disk
offload storage; that is not implemented yet, so the engine refuses them before any weight changes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["OffloadNotSupportedError", "onload_offloaded_block"]


class OffloadNotSupportedError(NotImplementedError):
    """Raised for a model whose decoder blocks are offloaded to CPU or disk by accelerate."""


@contextlib.contextmanager
def onload_offloaded_block(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    raise OffloadNotSupportedError(
        "This model has decoder blocks offloaded by accelerate (weights on the meta device). Pruning offloaded "
        "blocks is not supported yet: load the model without CPU/disk offload (e.g. device_map=None, or a "
        "device_map that keeps every block on a device)."
    )
    yield block  # pragma: no cover
