"""Capturing the inputs of the first decoder block (the "Catcher" pattern, made generic)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from .devices import execution_device, move_to

__all__ = ["BlockInputs", "block_kinds", "capture_block_inputs"]

logger = logging.getLogger(__name__)

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class StopForward(Exception):
    """Raised from a hook to end a forward pass early; `value` carries what the hook captured, if anything."""

    def __init__(self, value=None):
        super().__init__()
        self.value = value


@dataclass
class BlockInputs:
    """The calibration inputs of one block, kept on `storage` (CPU by default), one entry per batch.

    Attributes:
        hidden (`list[torch.Tensor]`): hidden states `[batch, seq, hidden]` per batch.
        args (`list[tuple]`): extra positional arguments the block was called with, per batch.
        kwargs (`list[dict]`): keyword arguments (attention mask, position ids/embeddings, ...), per batch.
            Equal tensors are shared between batches, so a large attention mask is stored once.
        variants (`dict`): `{block kind: (args, kwargs)}` when blocks of different kinds (`config.layer_types`, e.g.
            sliding-window and full attention) are called with different arguments; see `for_kind`.
    """

    hidden: list = field(default_factory=list)
    args: list = field(default_factory=list)
    kwargs: list = field(default_factory=list)
    variants: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def with_hidden(self, hidden: list) -> "BlockInputs":
        return BlockInputs(hidden=hidden, args=self.args, kwargs=self.kwargs, variants=self.variants)

    def for_kind(self, kind: Any) -> "BlockInputs":
        """The same hidden states with the arguments of a block of kind `kind` (see `block_kinds`)."""
        if kind not in self.variants:
            return self
        args, kwargs = self.variants[kind]
        return BlockInputs(hidden=self.hidden, args=args, kwargs=kwargs, variants=self.variants)


def block_kinds(model: nn.Module, num_blocks: int) -> list:
    """The kind of each block: blocks of one kind are called with the same arguments.

    transformers gives each block the attention mask (and, for Gemma 3, the rotary embeddings) of its entry in
    `config.layer_types` (sliding-window vs full attention); without `layer_types` every block gets block 0's.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == num_blocks:
        return list(types)
    return [None] * num_blocks


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
    kinds: Optional[dict[Any, nn.Module]] = None,
) -> BlockInputs:
    """Runs the model on `input_ids` until `first_block` and records everything the block is called with.

    The KV cache is switched off (`use_cache=False`, cache arguments set to `None`). Nothing after the first
    block runs, unless `kinds` (`{kind: first block of that kind}`, `first_block` included) names blocks called
    with other arguments: the forward then runs up to the last of them and records their arguments too
    (`BlockInputs.variants`, `BlockInputs.for_kind`).
    """
    captured = BlockInputs()
    kinds = dict(kinds) if kinds else {None: first_block}
    first_kind = next((k for k, b in kinds.items() if b is first_block), None)
    if kinds.get(first_kind) is not first_block:
        raise ValueError("`kinds` must include the first block.")
    previous: dict[Any, dict[str, Any]] = {}
    seen: set = set()

    def make_hook(kind: Any, block: nn.Module):
        def pre_hook(module, args, kwargs):
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
            kwargs = _dedupe(move_to(kwargs, storage), previous.get(kind, {}))
            previous[kind] = kwargs
            if block is first_block:
                captured.hidden.append(hidden.detach().to(storage))
            args_list, kwargs_list = captured.variants.setdefault(kind, ([], []))
            args_list.append(move_to(rest, storage))
            kwargs_list.append(kwargs)
            seen.add(kind)
            if len(seen) == len(kinds):
                raise StopForward

        return pre_hook

    device = execution_device(model)
    handles = [block.register_forward_pre_hook(make_hook(kind, block), with_kwargs=True) for kind, block in kinds.items()]
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            seen.clear()
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
            else:
                raise RuntimeError("The model never called its decoder blocks; cannot capture their inputs.")
    finally:
        for handle in handles:
            handle.remove()
    captured.args, captured.kwargs = captured.variants[first_kind]
    if len(kinds) == 1:
        captured.variants = {}
    return captured
