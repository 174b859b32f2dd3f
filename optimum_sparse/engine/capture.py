"""Capturing the inputs of the first decoder block (the "Catcher" pattern, made generic)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .devices import execution_device, move_to

__all__ = ["BlockInputs", "capture_block_inputs"]

logger = logging.getLogger(__name__)

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """The calibration inputs of one block, kept on `storage` (CPU by default), one entry per batch.

    Attributes:
        hidden (`list[torch.Tensor]`): hidden states `[batch, seq, hidden]` per batch.
        args (`list[tuple]`): extra positional arguments the block was called with, per batch.
        kwargs (`list[dict]`): keyword arguments (attention mask, position ids/embeddings, ...), per batch.
            Equal tensors are shared between batches, so a large attention mask is stored once.
    """

    hidden: list = field(default_factory=list)
    args: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def with_hidden(self, hidden: list) -> "BlockInputs":
        return BlockInputs(hidden=hidden, args=self.args, kwargs=self.kwargs)


def _dedupe(kwargs: dict, previous: dict) -> dict:
    out = {}
    for key, value in kwargs.items():
        old = previous.get(key)
        if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor) and old.shape == value.shape and torch.equal(old, value):
            out[key] = old
        elif isinstance(value, tuple) and isinstance(old, tuple) and len(old) == len(value) and all(
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(old, value)
        ):
            out[key] = old
        else:
            out[key] = value
    return out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int,
    storage: torch.device = torch.device("cpu"),
) -> BlockInputs:
    """Runs the model on `input_ids` until `first_block` and records everything the block is called with.

    The KV cache is switched off (`use_cache=False`, cache arguments set to `None`). Nothing after the first
    block runs.
    """
    captured = BlockInputs()
    previous: dict[str, Any] = {}

    def pre_hook(module, args, kwargs):
        nonlocal previous
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        rest = tuple(None if isinstance(a, tuple) or hasattr(a, "get_seq_length") else a for a in rest)
        for key in _CACHE_KWARGS:
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        kwargs = _dedupe(move_to(kwargs, storage), previous)
        previous = kwargs
        captured.hidden.append(hidden.detach().to(storage))
        captured.args.append(move_to(rest, storage))
        captured.kwargs.append(kwargs)
        raise _StopForward

    device = execution_device(model)
    handle = first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("The model never called its first decoder block; cannot capture its inputs.")
    finally:
        handle.remove()
    return captured
