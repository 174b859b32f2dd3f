"""The architecture table: where a model keeps its decoder blocks and how each block's linears are grouped.

Each entry names, relative to a decoder block, the linears in forward order (grouped: attention inputs,
attention output, MLP inputs, MLP output) and the MLP layout that global methods (SparseLLM) need. Unknown
decoders fall back to a generic search: the longest `nn.ModuleList` of identical blocks whose class is in
`model._no_split_modules`, with every linear of a block in one group.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch.nn as nn

from ..errors import UnsupportedModelError

__all__ = ["MLPSpec", "StructuredLayout", "ArchitectureSpec", "ARCHITECTURES", "MOE_ARCHITECTURES", "get_architecture", "find_blocks", "UnsupportedModelError"]

logger = logging.getLogger(__name__)


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
class StructuredLayout:
    """Where a block's attention heads and MLP channels live, for structured pruning (names relative to a block).

    A *KV group* is one key head, one value head and the `r = num_attention_heads / num_key_value_heads` query
    heads that read them; with `shared_kv` (multi-query attention) a group is one query head and the single key/value
    head is kept. An MLP channel is one row of every MLP input projection and one input column of the output one.

    Attributes:
        attention: the attention module (its head-count attributes are updated after head pruning).
        o: the attention output projection (input = concatenated heads).
        mlp_inputs: the MLP input projections (one row per channel; `[gate; up]` stacked when `fused_gate_up`).
        mlp_output: the MLP output projection (one input column per channel).
        q, k, v: separate query/key/value projections, or `None` when `qkv` is fused.
        qkv: a fused query/key/value projection, rows in `qkv_order`: `"blocks"` (`[q; k; v]`: GPT-2, Phi-3),
            `"per_head"` (`[heads, 3, head_dim]`: GPT-NeoX, Falcon without multi-query) or `"per_group"`
            (`[kv_heads, r + 2, head_dim]`: each group's queries, then its key and value: Falcon's new decoder).
        fused_gate_up: the single MLP input holds `[gate; up]` (Phi-3): a channel is a row in both halves.
        q_norm, k_norm: query/key norms that see more than one head, sliced with the heads; `qk_norm` says how:
            `"projection"` (weight `[heads·head_dim]`, OLMo-2/3) or `"per_head"` (weight `[heads, head_dim]`, Cohere).
            Norms over `head_dim` alone (Qwen3, Gemma 3) are shared by every head and not listed.
        head_attributes: `(attribute of the attention module, quantity)` pairs to update, quantity one of
            `"q_heads"`, `"kv_heads"`, `"q_width"` (query heads × head_dim); an attribute `config.<field>` makes the
            module read `<field>` from a per-layer view of the config (Phi-3 reads `config.num_attention_heads`).
        kv_heads_field: the config field holding the number of KV heads (`None`: as many as query heads).
        shared_kv: multi-query attention pruned query head by query head (the single KV head stays).
        mlp_field: the config field of the MLP width (stock form).
        heads_field: the config field of the number of query heads.
        stock_heads: the stock config can express fewer heads (it has a `head_dim` independent of `hidden_size`).
        bias_fields: `(config field, linears it gives a bias)` pairs: a bias added by compensation to one of them
            is expressed in the stock config by setting the field and giving the others zero biases.
    """

    attention: str
    o: str
    mlp_inputs: tuple
    mlp_output: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None
    qkv_order: str = "blocks"
    fused_gate_up: bool = False
    q_norm: Optional[str] = None
    k_norm: Optional[str] = None
    qk_norm: Optional[str] = None
    head_attributes: tuple = ()
    kv_heads_field: Optional[str] = "num_key_value_heads"
    shared_kv: bool = False
    mlp_field: Optional[str] = "intermediate_size"
    heads_field: str = "num_attention_heads"
    stock_heads: bool = True
    bias_fields: tuple = ()

    def bias_field(self, name: str) -> Optional[str]:
        """The config field that gives linear `name` (relative to a block) a bias, if any."""
        return next((field for field, names in self.bias_fields if name in names), None)

    @property
    def attention_inputs(self) -> tuple:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)


_ATTENTION_BIAS = ("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))
_MLP_BIAS = ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def _llama_layout(**overrides) -> StructuredLayout:
    fields = dict(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                  o="self_attn.o_proj", mlp_inputs=("mlp.gate_proj", "mlp.up_proj"), mlp_output="mlp.down_proj",
                  bias_fields=(_ATTENTION_BIAS,))
    fields.update(overrides)
    return StructuredLayout(**fields)


def _falcon_layout(config) -> StructuredLayout:
    """Falcon's three attention forms; ALiBi position bias is built for the stock head count and is refused."""
    if getattr(config, "alibi", False):
        raise UnsupportedModelError("Structured pruning of Falcon with alibi=True is not supported: the ALiBi bias "
                                    "is built for config.num_attention_heads in every block.")
    common = dict(attention="self_attention", qkv="self_attention.query_key_value", o="self_attention.dense",
                  mlp_inputs=("mlp.dense_h_to_4h",), mlp_output="mlp.dense_4h_to_h", mlp_field="ffn_hidden_size",
                  stock_heads=False, bias_fields=(("bias", ("self_attention.query_key_value", "self_attention.dense",
                                                            "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),))
    if config.new_decoder_architecture:
        return StructuredLayout(**common, qkv_order="per_group", kv_heads_field="num_kv_heads",
                                head_attributes=(("num_heads", "q_heads"), ("num_kv_heads", "kv_heads")))
    if config.multi_query:
        return StructuredLayout(**common, kv_heads_field=None, shared_kv=True,
                                head_attributes=(("num_heads", "q_heads"), ("num_key_value_groups", "q_heads")))
    return StructuredLayout(**common, qkv_order="per_head", kv_heads_field=None,
                            head_attributes=(("num_heads", "q_heads"), ("num_kv_heads", "kv_heads")))


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the blocks live (`blocks`, a dotted path from the model) and the ordered linear groups of a block.

    `structured` is the block's `StructuredLayout` (or a function of the model config returning it, for
    architectures whose attention layout depends on the config); `None` when structured pruning is not supported.
    """

    blocks: str
    groups: tuple[tuple[str, ...], ...]
    mlp: Optional[MLPSpec] = None
    structured: Union[StructuredLayout, Callable, None] = None

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
    structured=_llama_layout(),
)

_GEMMA_POST_NORM = ArchitectureSpec(
    blocks=_LLAMA_LIKE.blocks,
    groups=_LLAMA_LIKE.groups,
    mlp=MLPSpec(down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj", activation="mlp.act_fn", adds_to_residual=False),
    structured=_llama_layout(),
)

# OLMo-2/3: q/k RMSNorm over the whole projection, applied after it (post-norm blocks: no norm before attention/MLP)
_OLMO = ArchitectureSpec(
    blocks=_LLAMA_LIKE.blocks,
    groups=_LLAMA_LIKE.groups,
    mlp=MLPSpec(down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj", activation="mlp.act_fn", adds_to_residual=False),
    structured=_llama_layout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm="projection"),
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

_LLAMA_MLP_BIAS = dataclasses.replace(_LLAMA_LIKE, structured=_llama_layout(bias_fields=(_ATTENTION_BIAS, _MLP_BIAS)))
_NO_BIAS_FIELD = dataclasses.replace(_LLAMA_LIKE, structured=_llama_layout(bias_fields=()))

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_MLP_BIAS,
    "mistral": _NO_BIAS_FIELD,
    "qwen2": _NO_BIAS_FIELD,  # q/k/v always have a bias, o_proj never
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
    "olmo2": _OLMO,
    "olmo3": _OLMO,
    "granite": _LLAMA_MLP_BIAS,
    "cohere": ArchitectureSpec(  # parallel attention and MLP on one LayerNorm; optional per-head q/k LayerNorm
        blocks=_LLAMA_LIKE.blocks,
        groups=_LLAMA_LIKE.groups,
        mlp=_LLAMA_LIKE.mlp,
        structured=_llama_layout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm="per_head"),
    ),
    "phi3": ArchitectureSpec(
        blocks="model.layers",
        groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        mlp=MLPSpec(down="mlp.down_proj", up="mlp.gate_up_proj", activation="mlp.activation_fn", fused_gate_up=True),
        structured=StructuredLayout(
            attention="self_attn", qkv="self_attn.qkv_proj", o="self_attn.o_proj", mlp_inputs=("mlp.gate_up_proj",),
            mlp_output="mlp.down_proj", fused_gate_up=True,
            head_attributes=(("num_key_value_heads", "kv_heads"), ("config.num_attention_heads", "q_heads"))),
    ),
    "opt": ArchitectureSpec(
        blocks="model.decoder.layers",
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        mlp=MLPSpec(down="fc2", up="fc1", activation="activation_fn"),
        structured=StructuredLayout(
            attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
            o="self_attn.out_proj", mlp_inputs=("fc1",), mlp_output="fc2", head_attributes=(("num_heads", "q_heads"),),
            kv_heads_field=None, mlp_field="ffn_dim", stock_heads=False,
            bias_fields=(("enable_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.out_proj", "fc1", "fc2")),)),
    ),
    "gpt2": ArchitectureSpec(
        blocks="transformer.h",
        groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        mlp=MLPSpec(down="mlp.c_proj", up="mlp.c_fc", activation="mlp.act"),
        structured=StructuredLayout(
            attention="attn", qkv="attn.c_attn", o="attn.c_proj", mlp_inputs=("mlp.c_fc",), mlp_output="mlp.c_proj",
            head_attributes=(("num_heads", "q_heads"), ("split_size", "q_width")), kv_heads_field=None,
            mlp_field="n_inner", stock_heads=False),
    ),
    "gpt_neox": ArchitectureSpec(  # parallel residual by default (use_parallel_residual)
        blocks="gpt_neox.layers",
        groups=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)),
        mlp=MLPSpec(down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h", activation="mlp.act"),
        structured=StructuredLayout(
            attention="attention", qkv="attention.query_key_value", qkv_order="per_head", o="attention.dense",
            mlp_inputs=("mlp.dense_h_to_4h",), mlp_output="mlp.dense_4h_to_h", kv_heads_field=None,
            stock_heads=False, bias_fields=(("attention_bias", ("attention.query_key_value", "attention.dense")),)),
    ),
    # parallel attention by default; FalconLinear is an nn.Linear subclass. No MLP spec: the block adds the attention
    # output into the MLP output in place (`mlp_output += attention_output`), so a hook's copy of the FFN output is
    # not the FFN's output (SparseLLM prunes Falcon's FFN with SparseGPT, as before the entry existed).
    "falcon": ArchitectureSpec(
        blocks="transformer.h",
        groups=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                ("mlp.dense_4h_to_h",)),
        structured=_falcon_layout,
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
                return ArchitectureSpec(blocks=f"{prefix}.{tail}", groups=spec.groups, mlp=spec.mlp,
                                        structured=spec.structured)
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
