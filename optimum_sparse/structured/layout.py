"""Where the structures of a decoder block live: attention heads (KV groups) and MLP channels.

The layouts are the `structured` field of the architecture table (`optimum_sparse.engine.architectures`). A *KV
group* is one key head, one value head and the `r = num_attention_heads / num_key_value_heads` query heads that
read them (`r = 1` without GQA). Removing a group deletes its rows in q/k/v (or the fused projection) and its
`r·head_dim` input columns of the attention output projection, so the query-per-KV ratio stays fixed. An MLP
channel is one row of every MLP input projection (gate/up, fc1, c_fc) and one input column of the output
projection (down_proj, fc2, c_proj). The hidden size is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..engine.architectures import ARCHITECTURES, StructuredLayout, UnsupportedModelError, get_architecture
from ..engine.linears import in_features

__all__ = ["StructuredLayout", "STRUCTURED_LAYOUTS", "get_structured_layout", "HeadGeometry", "head_geometry",
           "structured_model_types"]


def structured_model_types() -> list[str]:
    """Model types whose table entry has a structured layout."""
    return sorted(name for name, spec in ARCHITECTURES.items() if spec.structured is not None)


# kept for compatibility: the table is the source (config-dependent layouts, e.g. Falcon's, are not listed)
STRUCTURED_LAYOUTS = {name: spec.structured for name, spec in ARCHITECTURES.items()
                      if isinstance(spec.structured, StructuredLayout)}


def get_structured_layout(model: nn.Module) -> StructuredLayout:
    """The structured layout of `model` (from the architecture table), or an error naming what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None or spec.structured is None:
        raise UnsupportedModelError(
            f"Structured pruning supports model types {structured_model_types()}, got {model_type!r}: no structured "
            "layout (attention q/k/v/o and MLP input/output names) for it in the architecture table. Use an "
            "unstructured or N:M structure, or add a `structured` layout to its entry in "
            "optimum_sparse.engine.architectures.ARCHITECTURES."
        )
    layout = spec.structured if isinstance(spec.structured, StructuredLayout) else spec.structured(config)
    get_architecture(model)  # the engine must find the blocks too
    return layout


@dataclass(frozen=True)
class HeadGeometry:
    """Head sizes of a model: `head_dim`, query heads per KV group (`q_per_kv`) and whether the KV head is shared by
    every group (`shared_kv`: multi-query attention, one query head per group)."""

    head_dim: int
    q_per_kv: int
    shared_kv: bool = False

    @property
    def group_width(self) -> int:
        """Input columns of the output projection per KV group."""
        return self.head_dim * self.q_per_kv

    def num_groups(self, block: nn.Module, layout: StructuredLayout) -> int:
        """Number of KV groups currently in `block` (read from the output projection's width)."""
        return in_features(block.get_submodule(layout.o)) // self.group_width


def head_geometry(config, layout: StructuredLayout | None = None) -> HeadGeometry:
    """The head geometry of `config` (under `layout`'s field names; Llama's by default)."""
    heads = getattr(config, layout.heads_field if layout else "num_attention_heads")
    kv_field = layout.kv_heads_field if layout else "num_key_value_heads"
    kv_heads = (getattr(config, kv_field, None) if kv_field else None) or heads
    head_dim = getattr(config, "head_dim", None) if (layout is None or layout.stock_heads) else None
    head_dim = head_dim or config.hidden_size // heads
    if layout is not None and layout.shared_kv:
        return HeadGeometry(head_dim=int(head_dim), q_per_kv=1, shared_kv=True)
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}.")
    return HeadGeometry(head_dim=int(head_dim), q_per_kv=heads // kv_heads)
