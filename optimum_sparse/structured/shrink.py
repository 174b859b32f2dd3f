"""Physically shrinking a decoder block, and writing the new sizes into the model's config.

After pruning, every resized linear is a new, smaller module (contiguous weights): the model is a plain dense
model that runs faster everywhere. `finalize_config` then records the sizes:

- if every block has the same sizes and the stock config can express them (`intermediate_size`/`ffn_dim`/
  `n_inner`; `num_attention_heads`, `num_key_value_heads`, `head_dim` for Llama-like models) and no bias was
  added, the stock config is edited: the checkpoint loads anywhere (transformers, vLLM, llama.cpp);
- otherwise the model becomes an instance of the matching `Pruned*` class of `modeling_pruned.py` (a subclass of
  the stock class) and the config gets `pruned_modules`/`pruned_attributes`; `save_pretrained` copies
  `modeling_pruned.py` beside the weights and writes `auto_map`, so `AutoModelForCausalLM.from_pretrained(folder,
  trust_remote_code=True)` rebuilds it.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn

from ..engine.block import LayerReport
from ..engine.linears import in_features
from .layout import HeadGeometry, StructuredLayout
from .modeling_pruned import PRUNED_CLASSES, set_module_attribute

__all__ = ["shrunk_layer_report", "out_features", "resize_linear", "shrink_heads", "shrink_channels", "finalize_config", "count_parameters",
           "head_attribute_values"]

logger = logging.getLogger(__name__)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]


def shrunk_layer_report(name: str, original_shape: tuple, shape: tuple) -> LayerReport:
    """The report of a weight made smaller by structured pruning: its new and original shapes and the removed
    fraction of its entries (`sparsity` stays 0: what is left is dense)."""
    removed = 1.0 - math.prod(shape) / math.prod(original_shape)
    return LayerReport(name=name, shape=tuple(shape), sparsity=0.0,
                       extra={"original_shape": list(original_shape), "removed_fraction": removed})


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, tied tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def resize_linear(module: nn.Module, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None,
                  weight: Optional[torch.Tensor] = None, bias_delta: Optional[torch.Tensor] = None) -> nn.Module:
    """A new linear keeping output `rows` and input `cols` of `module` (`[out, in]` convention, Conv1D included).

    Args:
        rows, cols: indices to keep (`None`: all).
        weight: float32 `[len(rows), len(cols)]` weight to use instead of the sliced one (compensated weights).
        bias_delta: added to the (kept) bias; a bias is created when the module has none.
    """
    w = module.weight.detach()
    w = w.t() if _is_conv1d(module) else w  # [out, in]
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    if weight is not None:
        if tuple(weight.shape) != tuple(w.shape):
            raise ValueError(f"Compensated weight has shape {tuple(weight.shape)}, expected {tuple(w.shape)}.")
        if not torch.isfinite(weight).all():
            raise FloatingPointError("Refusing to write non-finite values into a pruned weight.")
        w = weight.to(dtype=w.dtype, device=w.device)
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    if bias_delta is not None:
        if not torch.isfinite(bias_delta).all():
            raise FloatingPointError("Refusing to write a non-finite bias.")
        base = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        bias = (base.to(torch.float32) + bias_delta.to(base.device, torch.float32)).to(w.dtype)
    out_f, in_f = w.shape
    if _is_conv1d(module):
        new = type(module)(out_f, in_f)
        new.weight = nn.Parameter(w.t().contiguous(), requires_grad=module.weight.requires_grad)
        new.bias = nn.Parameter((bias if bias is not None else torch.zeros(out_f, dtype=w.dtype, device=w.device)).contiguous())
    else:
        new = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(w.contiguous(), requires_grad=module.weight.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias.contiguous())
    return new


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)


def _expand(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the `width` consecutive features of every kept group."""
    return (groups.unsqueeze(1) * width + torch.arange(width, device=groups.device)).reshape(-1)


def _qkv_rows(layout: StructuredLayout, geometry: HeadGeometry, num_groups: int, keep: torch.Tensor) -> torch.Tensor:
    """Rows of the fused q/k/v projection that the kept groups own, in the projection's row order."""
    hd, r = geometry.head_dim, geometry.q_per_kv
    if layout.qkv_order == "per_head":  # [heads, 3, head_dim] (r == 1)
        return _expand(keep, 3 * hd)
    if layout.qkv_order == "per_group":  # [kv_heads, r + 2, head_dim]
        return _expand(keep, (r + 2) * hd)
    q_width = num_groups * geometry.group_width
    if geometry.shared_kv:  # [q; k; v] with the one key/value head kept whole
        return torch.cat([_expand(keep, hd), torch.arange(q_width, q_width + 2 * hd)])
    kv_rows = _expand(keep, hd)
    kv_width = num_groups * hd
    return torch.cat([_expand(keep, geometry.group_width), q_width + kv_rows, q_width + kv_width + kv_rows])


def _slice_norm(attention: nn.Module, name: str, layout: StructuredLayout, heads: torch.Tensor, head_dim: int) -> None:
    """Keeps the entries of a q/k norm that belong to the kept `heads` (no-op when the module has no such norm)."""
    norm = getattr(attention, name.rpartition(".")[2], None)
    if getattr(norm, "weight", None) is None:
        return
    index = heads if layout.qk_norm == "per_head" else _expand(heads, head_dim)
    for attribute in ("weight", "bias"):
        tensor = getattr(norm, attribute, None)
        if tensor is not None:
            setattr(norm, attribute, nn.Parameter(tensor.detach().index_select(0, index.to(tensor.device)).contiguous(),
                                                  requires_grad=tensor.requires_grad))


def head_attribute_values(layout: StructuredLayout, geometry: HeadGeometry, groups: int) -> dict:
    """`{attribute: value}` of an attention module holding `groups` KV groups (`layout.head_attributes`)."""
    values = {"q_heads": groups * geometry.q_per_kv, "kv_heads": 1 if geometry.shared_kv else groups,
              "q_width": groups * geometry.group_width}
    return {attribute: values[quantity] for attribute, quantity in layout.head_attributes}


def shrink_heads(block: nn.Module, layout: StructuredLayout, geometry: HeadGeometry, keep: torch.Tensor,
                 o_weight: Optional[torch.Tensor] = None, o_bias_delta: Optional[torch.Tensor] = None) -> None:
    """Keeps the KV groups `keep` (sorted indices) of `block`'s attention.

    `o_weight` (`[hidden, kept·group_width]`) replaces the kept output-projection columns (compensation);
    `o_bias_delta` is added to its bias. Query/key norms over several heads are sliced with the heads.
    """
    keep = keep.sort().values.to(torch.long)
    num_groups = geometry.num_groups(block, layout)
    q_rows = _expand(keep, geometry.group_width)
    if layout.qkv:
        rows = _qkv_rows(layout, geometry, num_groups, keep)
        _replace(block, layout.qkv, resize_linear(block.get_submodule(layout.qkv), rows=rows))
    else:
        kv_rows = torch.arange(geometry.head_dim) if geometry.shared_kv else _expand(keep, geometry.head_dim)
        for name, rows in ((layout.q, q_rows), (layout.k, kv_rows), (layout.v, kv_rows)):
            _replace(block, name, resize_linear(block.get_submodule(name), rows=rows))
    _replace(block, layout.o, resize_linear(block.get_submodule(layout.o), cols=q_rows, weight=o_weight,
                                            bias_delta=o_bias_delta))
    attention = block.get_submodule(layout.attention)
    if layout.q_norm:
        _slice_norm(attention, layout.q_norm, layout, _expand(keep, geometry.q_per_kv), geometry.head_dim)
    if layout.k_norm and not geometry.shared_kv:
        _slice_norm(attention, layout.k_norm, layout, keep, geometry.head_dim)
    for attribute, value in head_attribute_values(layout, geometry, len(keep)).items():
        set_module_attribute(attention, attribute, value)


def shrink_channels(block: nn.Module, layout: StructuredLayout, keep: torch.Tensor,
                    down_weight: Optional[torch.Tensor] = None, down_bias_delta: Optional[torch.Tensor] = None) -> None:
    """Keeps the MLP channels `keep` of `block` (rows of the inputs, columns of the output projection)."""
    keep = keep.sort().values.to(torch.long)
    rows = keep
    if layout.fused_gate_up:  # [gate; up]: the same channel in both halves
        rows = torch.cat([keep, in_features(block.get_submodule(layout.mlp_output)) + keep])
    for name in layout.mlp_inputs:
        _replace(block, name, resize_linear(block.get_submodule(name), rows=rows))
    _replace(block, layout.mlp_output, resize_linear(block.get_submodule(layout.mlp_output), cols=keep,
                                                      weight=down_weight, bias_delta=down_bias_delta))


def _express_added_biases(config, layout: StructuredLayout, blocks: nn.ModuleList, prefix: str,
                          added: list[str]) -> None:
    """`uniform_shapes`: biases added by compensation become stock: the config field that gives those linears a
    bias is set, and the other linears it covers get zero biases (in every block)."""
    fields = set()
    for name in added:
        relative = name[len(prefix) + 1:].partition(".")[2]
        field = layout.bias_field(relative)
        if field is None:  # refused before any change by StructuredPlan.check_method
            raise RuntimeError(f"No stock config field gives {relative} a bias.")
        fields.add(field)
    for field, names in layout.bias_fields:
        if field not in fields:
            continue
        for block in blocks:
            for name in names:
                module = block.get_submodule(name)
                if getattr(module, "bias", None) is None:
                    module.bias = nn.Parameter(torch.zeros(out_features(module), dtype=module.weight.dtype,
                                                           device=module.weight.device))
        setattr(config, field, True)


def finalize_config(model: nn.Module, layout: StructuredLayout, geometry: HeadGeometry, blocks: nn.ModuleList,
                    prefix: str, original_shapes: dict[str, tuple[int, int, bool]], uniform_shapes: bool = False) -> str:
    """Records the new sizes in `model.config`; returns the format used (`"stock"` or `"per-layer"`).

    Args:
        original_shapes: `{full linear name: (out, in, has_bias)}` before pruning, for every prunable linear.
        uniform_shapes: the stock form is required; biases added by compensation are expressed through the
            layout's `bias_fields` (zero biases on the other linears those fields cover).
    """
    config = model.config
    current = {}
    for name in original_shapes:
        module = model.get_submodule(name)
        current[name] = (out_features(module), in_features(module), getattr(module, "bias", None) is not None)
    changed = {name: shape for name, shape in current.items() if shape != original_shapes[name]}
    if not changed:
        return "stock"
    mlp_field, heads_in_stock = layout.mlp_field, layout.stock_heads
    widths = {in_features(block.get_submodule(layout.mlp_output)) for block in blocks}
    groups = {geometry.num_groups(block, layout) for block in blocks}
    original_groups = getattr(config, layout.heads_field) // geometry.q_per_kv
    added = [name for name, shape in current.items() if shape[2] and not original_shapes[name][2]]
    if uniform_shapes and added:
        _express_added_biases(config, layout, blocks, prefix, added)
        added = []
    uniform = len(widths) == 1 and len(groups) == 1 and not added
    if uniform and (heads_in_stock or groups == {original_groups}) and mlp_field is not None:
        setattr(config, mlp_field, widths.pop())
        kept = groups.pop()
        if kept != original_groups:
            config.head_dim = geometry.head_dim
            if layout.kv_heads_field:
                setattr(config, layout.kv_heads_field, kept)
            setattr(config, layout.heads_field, kept * geometry.q_per_kv)
        return "stock"
    if uniform_shapes:  # the plan's checks make this unreachable
        raise RuntimeError(f"uniform_shapes=True ended with per-block sizes: KV groups {sorted(groups)}, MLP widths "
                           f"{sorted(widths)}.")
    name_of_class = type(model).__name__
    pruned_class = name_of_class if name_of_class in PRUNED_CLASSES.values() else PRUNED_CLASSES.get(name_of_class)
    if pruned_class is None:
        raise ValueError(f"No per-layer pruned class for {type(model).__name__}; supported: {sorted(PRUNED_CLASSES)}.")
    from . import modeling_pruned

    # a model pruned before keeps its earlier entries (current shapes win)
    previous = dict(getattr(config, "pruned_modules", None) or {})
    previous.update({name: list(shape) for name, shape in changed.items()})
    config.pruned_modules = dict(sorted(previous.items()))
    config.pruned_attributes = dict(getattr(config, "pruned_attributes", None) or {})
    norms = dict(getattr(config, "pruned_norms", None) or {})
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}.{layout.attention}"
        if layout.head_attributes:
            config.pruned_attributes[name] = head_attribute_values(layout, geometry, geometry.num_groups(block, layout))
        for norm_name in filter(None, (layout.q_norm, layout.k_norm)):
            norm = getattr(block.get_submodule(layout.attention), norm_name.rpartition(".")[2], None)
            if getattr(norm, "weight", None) is not None:
                norms[f"{prefix}.{index}.{norm_name}"] = list(norm.weight.shape)
    if norms:
        config.pruned_norms = dict(sorted(norms.items()))
    model.__class__ = getattr(modeling_pruned, pruned_class)
    logger.info("Layers have different sizes: saving with per-layer shapes (%s, trust_remote_code=True).", pruned_class)
    return "per-layer"
