"""Where the structures of a decoder block live: attention heads (KV groups) and MLP channels.

A *KV group* is one key head, one value head and the `r = num_attention_heads / num_key_value_heads` query heads
that read them (`r = 1` without GQA). Removing a group deletes its rows in q/k/v (or the fused c_attn) and its
`r·head_dim` input columns of the attention output projection, so the query-per-KV ratio stays fixed. An MLP
channel is one row of every MLP input projection (gate/up, fc1, c_fc) and one input column of the output
projection (down_proj, fc2, c_proj). The hidden size is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from ..engine.architectures import get_architecture
from ..engine.linears import in_features

__all__ = ["StructuredLayout", "STRUCTURED_LAYOUTS", "get_structured_layout", "HeadGeometry", "head_geometry"]


@dataclass(frozen=True)
class StructuredLayout:
    """Names (relative to a decoder block) of the linears that carry heads and channels.

    Attributes:
        attention: the attention module (its head-count attributes are updated after head pruning).
        q, k, v: separate query/key/value projections, or `None` when `qkv` is fused.
        qkv: a fused `[q; k; v]` projection (GPT-2's `c_attn`).
        o: the attention output projection (input = concatenated heads).
        head_attributes: attention attributes that hold the number of query heads (`num_heads`) and, for fused
            projections, the width of one of q/k/v (`split_size`); `None` when the module reads neither.
        mlp_inputs: the MLP input projections (one row per channel).
        mlp_output: the MLP output projection (one input column per channel).
    """

    attention: str
    o: str
    mlp_inputs: tuple
    mlp_output: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None
    head_attributes: tuple = ()

    @property
    def attention_inputs(self) -> tuple:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)


_LLAMA = StructuredLayout(
    attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj",
)

STRUCTURED_LAYOUTS: dict[str, StructuredLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # q_norm/k_norm act on head_dim, shared by every head: untouched
    "opt": StructuredLayout(
        attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        o="self_attn.out_proj", mlp_inputs=("fc1",), mlp_output="fc2", head_attributes=("num_heads",),
    ),
    "gpt2": StructuredLayout(
        attention="attn", qkv="attn.c_attn", o="attn.c_proj", mlp_inputs=("mlp.c_fc",), mlp_output="mlp.c_proj",
        head_attributes=("num_heads", "split_size"),
    ),
}


def get_structured_layout(model: nn.Module) -> StructuredLayout:
    """The structured layout of `model`, or a `ValueError` naming the supported model types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = STRUCTURED_LAYOUTS.get(model_type)
    if layout is None:
        raise ValueError(
            f"Structured pruning supports model types {sorted(STRUCTURED_LAYOUTS)}, got {model_type!r}; "
            "use an unstructured or N:M structure, or add an entry to "
            "optimum_sparse.structured.layout.STRUCTURED_LAYOUTS."
        )
    get_architecture(model)  # the engine must find the blocks too
    return layout


@dataclass(frozen=True)
class HeadGeometry:
    """Head sizes of a model: `head_dim` and query heads per KV head (`q_per_kv`)."""

    head_dim: int
    q_per_kv: int

    @property
    def group_width(self) -> int:
        """Input columns of the output projection per KV group."""
        return self.head_dim * self.q_per_kv

    def num_groups(self, block: nn.Module, layout: StructuredLayout) -> int:
        """Number of KV groups currently in `block` (read from the output projection's width)."""
        return in_features(block.get_submodule(layout.o)) // self.group_width


def head_geometry(config) -> HeadGeometry:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}.")
    return HeadGeometry(head_dim=int(head_dim), q_per_kv=heads // kv_heads)
