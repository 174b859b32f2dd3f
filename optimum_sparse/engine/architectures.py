"""The architecture table: where a model keeps its decoder blocks and how each block's linears are grouped.

Each entry names, relative to a decoder block, the linears in forward order (grouped: attention inputs,
attention output, MLP inputs, MLP output) and the MLP layout that global methods (SparseLLM) need. Unknown
decoders fall back to a generic search: the longest `nn.ModuleList` of identical blocks whose class is in
`model._no_split_modules`, with every linear of a block in one group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

__all__ = ["MLPSpec", "ArchitectureSpec", "ARCHITECTURES", "MOE_ARCHITECTURES", "get_architecture", "find_blocks", "UnsupportedModelError"]

logger = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """Raised when the engine cannot find the decoder blocks of a model."""


@dataclass(frozen=True)
class MLPSpec:
    """Layout of a block's feed-forward network, names relative to the block.

    Attributes:
        down: the output projection (`mlp.down_proj`, `fc2`, `mlp.c_proj`, ...).
        up: the input projection (`mlp.up_proj`, `fc1`, ...), or the fused `[gate; up]` projection when
            `fused_gate_up` is set.
        gate: the gate projection of a gated MLP (SwiGLU/GeGLU), `None` for plain MLPs or fused layouts.
        activation: dotted path of the activation module/function, relative to the block.
        fused_gate_up: `up` holds `[gate; up]` stacked on the output dimension (Phi-3).
        adds_to_residual: the FFN output is added unchanged to the block output (no norm after the FFN, as in
            Gemma 2/3's `post_feedforward_layernorm`, and no post-LN block).
    """

    down: str
    up: str
    gate: Optional[str] = None
    activation: str = "mlp.act_fn"
    fused_gate_up: bool = False
    adds_to_residual: bool = True

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the blocks live (`blocks`, a dotted path from the model) and the ordered linear groups of a block."""

    blocks: str
    groups: tuple[tuple[str, ...], ...]
    mlp: Optional[MLPSpec] = None

    @property
    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group]


_LLAMA_LIKE = ArchitectureSpec(
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    mlp=MLPSpec(down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj", activation="mlp.act_fn"),
)

_GEMMA_POST_NORM = ArchitectureSpec(
    blocks=_LLAMA_LIKE.blocks,
    groups=_LLAMA_LIKE.groups,
    mlp=MLPSpec(down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj", activation="mlp.act_fn", adds_to_residual=False),
)

def _moe_spec(ffn: str, activation: str) -> ArchitectureSpec:
    """Mixture-of-experts decoders. `<ffn>.experts.*.<projection>` stands for every expert's projection of a fused
    experts module (`engine.experts`); shared experts and dense blocks (DeepSeek's first blocks, Llama-4's interleaved
    dense blocks) are ordinary linears. The MLP spec describes the dense blocks' FFN (SparseLLM)."""
    shared = (f"{ffn}.shared_expert", f"{ffn}.shared_experts")
    return ArchitectureSpec(
        blocks="model.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_a_proj",
             "self_attn.kv_a_proj_with_mqa", "linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"),
            ("self_attn.q_b_proj", "self_attn.kv_b_proj"),
            ("self_attn.o_proj", "linear_attn.out_proj"),
            (f"{ffn}.experts.*.gate_up_proj", f"{ffn}.experts.*.up_proj", f"{ffn}.gate_proj", f"{ffn}.up_proj",
             *(f"{s}.{p}" for s in shared for p in ("gate_proj", "up_proj"))),
            (f"{ffn}.experts.*.down_proj", f"{ffn}.down_proj", *(f"{s}.down_proj" for s in shared)),
        ),
        mlp=MLPSpec(down=f"{ffn}.down_proj", up=f"{ffn}.up_proj", gate=f"{ffn}.gate_proj", activation=activation),
    )


_MOE = _moe_spec("mlp", "mlp.act_fn")

# Mixture-of-experts decoders: their groups name every layout variant (attention kinds, shared experts, dense blocks)
# and so list names a given block may lack; tested in tests/moe/.
MOE_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2", "deepseek_v3",
                     "gpt_oss", "phimoe"), _MOE),
    "granitemoe": _moe_spec("block_sparse_moe", "block_sparse_moe.act_fn"),
    "llama4_text": _moe_spec("feed_forward", "feed_forward.activation_fn"),
}

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
    "phi3": ArchitectureSpec(
        blocks="model.layers",
        groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        mlp=MLPSpec(down="mlp.down_proj", up="mlp.gate_up_proj", activation="mlp.activation_fn", fused_gate_up=True),
    ),
    "opt": ArchitectureSpec(
        blocks="model.decoder.layers",
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        mlp=MLPSpec(down="fc2", up="fc1", activation="activation_fn"),
    ),
    "gpt2": ArchitectureSpec(
        blocks="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        mlp=MLPSpec(down="mlp.c_proj", up="mlp.c_fc", activation="mlp.act"),
    ),
    "gpt_neox": ArchitectureSpec(
        blocks="gpt_neox.layers",
        groups=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
        mlp=MLPSpec(down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h", activation="mlp.act"),
    ),
}


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _generic_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best: Optional[tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child).__name__ for child in module}
        if len(classes) != 1:
            continue
        if no_split and not classes & no_split:
            continue
        if not any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UnsupportedModelError(
            f"Cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of identical blocks "
            f"(classes {sorted(no_split) or 'unknown'}) holding linear layers. Add an entry to "
            "optimum_sparse.engine.architectures.ARCHITECTURES."
        )
    return best


def get_architecture(model: nn.Module) -> ArchitectureSpec:
    """Returns the table entry for `model.config.model_type`, or a generic spec found by search."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type) or MOE_ARCHITECTURES.get(model_type)
    if spec is not None and isinstance(_get_path(model, spec.blocks), nn.ModuleList):
        return spec
    if spec is not None:
        # e.g. a multimodal wrapper whose text blocks sit under another prefix
        for prefix in ("model.language_model", "language_model.model", "model.text_model"):
            tail = spec.blocks.split(".")[-1]
            if isinstance(_get_path(model, f"{prefix}.{tail}"), nn.ModuleList):
                return ArchitectureSpec(blocks=f"{prefix}.{tail}", groups=spec.groups, mlp=spec.mlp)
    path, blocks = _generic_blocks(model)
    names = tuple(
        name for name, m in blocks[0].named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    )
    logger.info("No architecture entry for model_type=%r; using generic blocks at %r.", model_type, path)
    return ArchitectureSpec(blocks=path, groups=(names,), mlp=None)


def find_blocks(model: nn.Module, spec: Optional[ArchitectureSpec] = None) -> nn.ModuleList:
    spec = spec or get_architecture(model)
    blocks = _get_path(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.ModuleList at {spec.blocks!r}.")
    return blocks
