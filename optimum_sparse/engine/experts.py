"""Fused mixture-of-experts weights as prunable `[out, in]` matrices, one per expert and projection.

transformers 5 keeps a block's experts as 3-D parameters of one module (`mlp.experts`): `gate_up_proj` `[E, 2f, d]`
and `down_proj` `[E, d, f]`, or transposed (`[E, d, 2f]` / `[E, f, d]`: gpt-oss, Llama-4). `EXPERTS_LAYOUTS` names
each storage layout once; `experts_layout` picks it from the flags transformers' `@use_experts_implementation` sets
on the module (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`), from the class for Llama-4 (whose experts
take inputs already scaled by the router), or from the shapes (a generic rule for other fused experts).

`ExpertLinear` is the engine's handle on one expert's projection: its `weight` is an `[out, in]` view into the fused
parameter, so `read_weight`, the statistics, the methods, allocation and checkpoints treat it as a linear;
`write_weight` writes through it (finite values, canonical zeros, offloaded storage updated). Its name, relative to the
block, is `<experts module>.<expert>.<projection>` (e.g. `mlp.experts.7.gate_up_proj`), which `targets`/`ignore`
match like module names.

`expert_intermediate` computes an expert's activation with the model's own code (`_apply_gate`, `act_fn`, biases):
the input of its down projection. `RoutedTokens` reads the router's decision from the experts module's call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .offload import update_offloaded_tensor

__all__ = [
    "ExpertsLayout", "EXPERTS_LAYOUTS", "ExpertLinear", "experts_layout", "find_experts_modules", "expert_handles",
    "expert_intermediate", "expert_output", "routed_tokens", "is_router", "experts_routers", "layout_count",
    "table_name", "ROUTER_NAMES",
]

# last name component of a routing linear that sits beside an experts module
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one kind of fused experts module stores and calls its experts.

    Attributes:
        name: the layout's key in `EXPERTS_LAYOUTS`.
        transposed: weights stored `[E, in, out]` (applied as `x @ W[e]`) instead of `[E, out, in]`.
        interleaved: the gate and up rows of `gate_up_proj` alternate (gpt-oss) instead of `[gate; up]`.
        bias: `<proj>_bias` parameters `[E, out]` exist.
        gated: `gate_up_proj` (a gated activation) instead of a plain `up_proj`.
        input_scaled: the module is called as `experts(x)` on `[E·T, d]` inputs already multiplied by each expert's
            routing weight (zero rows for unrouted tokens; Llama-4), instead of `experts(x, top_k_index, top_k_weights)`
            with the output scaled by the routing weight.
    """

    name: str
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    gated: bool = True
    input_scaled: bool = False

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    @property
    def projections(self) -> tuple[str, str]:
        return (self.up_name, "down_proj")


EXPERTS_LAYOUTS: dict[str, ExpertsLayout] = {
    # Mixtral, Qwen2/3-MoE, Qwen3-Next, OLMoE, DeepSeek-V2/V3, Granite-MoE, Phi-MoE
    "concatenated": ExpertsLayout("concatenated"),
    "gpt_oss": ExpertsLayout("gpt_oss", transposed=True, interleaved=True, bias=True),
    "llama4": ExpertsLayout("llama4", transposed=True, input_scaled=True),
}
_BY_CLASS = {"Llama4TextExperts": "llama4"}


def experts_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of a fused experts module, or `None` when `module` holds no fused 3-D expert weights."""
    down = getattr(module, "down_proj", None)
    gated = isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
    up = getattr(module, "gate_up_proj" if gated else "up_proj", None)
    if not (isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.dim() == 3 and up.dim() == 3):
        return None
    if type(module).__name__ in _BY_CLASS:
        return EXPERTS_LAYOUTS[_BY_CLASS[type(module).__name__]]
    if hasattr(module, "is_transposed"):  # set by transformers' @use_experts_implementation
        flags = (bool(module.is_transposed), not getattr(module, "is_concatenated", True),
                 bool(getattr(module, "has_bias", False)), bool(getattr(module, "has_gate", True)))
        for layout in EXPERTS_LAYOUTS.values():
            if (layout.transposed, layout.interleaved, layout.bias, layout.gated) == flags and not layout.input_scaled:
                return layout
        return ExpertsLayout("flags", *flags)
    width = 2 if gated else 1
    if up.shape[1] == width * down.shape[2] and up.shape[2] == down.shape[1]:
        return ExpertsLayout("generic", gated=gated, bias=hasattr(module, "down_proj_bias"))
    if up.shape[2] == width * down.shape[1] and up.shape[1] == down.shape[2]:
        return ExpertsLayout("generic-transposed", transposed=True, gated=gated, bias=hasattr(module, "down_proj_bias"))
    return None


def find_experts_modules(block: nn.Module) -> dict[str, tuple[nn.Module, ExpertsLayout]]:
    """`{name relative to block: (experts module, layout)}` for every fused experts module of a block."""
    found = {}
    for name, module in block.named_modules():
        layout = experts_layout(module) if name else None
        if layout is not None:
            found[name] = (module, layout)
    return found


def is_router(block: nn.Module, name: str) -> bool:
    """Whether the module `name` (relative to `block`) routes tokens to experts: named `gate`, `router` or
    `shared_expert_gate`, beside a fused experts module or an `experts` list."""
    parent_name, _, last = name.rpartition(".")
    if last not in ROUTER_NAMES:
        return False
    parent = block.get_submodule(parent_name) if parent_name else block
    return hasattr(parent, "experts")


def experts_routers(parent: nn.Module, num_experts: int) -> list[tuple[str, nn.Module]]:
    """`[(attribute, module)]` of the routers of an experts module: the children of `parent` (the module holding the
    experts) named like a router whose `weight` is `[num_experts, d]`, one row per expert."""
    found = []
    for attribute in ROUTER_NAMES:
        module = getattr(parent, attribute, None)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and weight.shape[0] == num_experts:
            found.append((attribute, module))
    return found


class ExpertLinear:
    """One expert's projection inside a fused experts module, seen as a linear layer.

    Args:
        experts: the fused experts module.
        index: the expert.
        projection: `"gate_up_proj"`, `"up_proj"` or `"down_proj"`.
        layout: the module's `ExpertsLayout`.
    """

    def __init__(self, experts: nn.Module, index: int, projection: str, layout: ExpertsLayout):
        self.experts = experts
        self.index = index
        self.projection = projection
        self.layout = layout

    @property
    def parameter(self) -> nn.Parameter:
        return getattr(self.experts, self.projection)

    @property
    def weight(self) -> torch.Tensor:
        """`[out, in]` view of this expert's weight (writes through to the fused parameter)."""
        w = self.parameter[self.index]
        return w.t() if self.layout.transposed else w

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.experts, f"{self.projection}_bias")[self.index] if self.layout.bias else None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def write(self, weight: torch.Tensor, name: str = "") -> None:
        """Writes a float32 `[out, in]` weight into the fused parameter; refuses non-finite values."""
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"Refusing to write non-finite values into {name or self}.")
        target = self.weight
        new = weight.to(dtype=target.dtype, device=target.device)
        new[new == 0] = 0.0  # canonical +0.0
        target.copy_(new)
        update_offloaded_tensor(self.experts, self.projection, self.parameter)

    def __repr__(self) -> str:
        return f"ExpertLinear({type(self.experts).__name__}[{self.index}].{self.projection}, {tuple(self.weight.shape)})"


def table_name(name: str, module) -> str:
    """A target's name in the architecture table's groups: an expert projection `mlp.experts.7.down_proj` is
    `mlp.experts.*.down_proj`; a linear keeps its name."""
    if isinstance(module, ExpertLinear):
        head, _, projection = name.rsplit(".", 2)
        return f"{head}.*.{projection}"
    return name


def expert_handles(block: nn.Module) -> dict[str, ExpertLinear]:
    """Every expert projection of a block, `{"<experts>.<e>.<projection>": ExpertLinear}`, up projections first."""
    handles = {}
    for name, (module, layout) in find_experts_modules(block).items():
        count = layout_count(module, layout)
        for projection in layout.projections:
            for e in range(count):
                handles[f"{name}.{e}.{projection}"] = ExpertLinear(module, e, projection, layout)
    return handles


def layout_count(module: nn.Module, layout: ExpertsLayout) -> int:
    """The number of experts of a fused experts module."""
    return getattr(module, layout.up_name).shape[0]


def _linear(x: torch.Tensor, handle: ExpertLinear) -> torch.Tensor:
    out = x @ handle.weight.to(device=x.device, dtype=torch.float32).t()
    if handle.bias is not None:
        out = out + handle.bias.to(device=x.device, dtype=torch.float32)
    return out


def expert_intermediate(experts: nn.Module, layout: ExpertsLayout, index: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert `index`'s down projection for inputs `x` `[n, d]` (float32), with the model's own gate."""
    up = _linear(x.to(torch.float32), ExpertLinear(experts, index, layout.up_name, layout))
    if not layout.gated:
        return experts.act_fn(up)
    if hasattr(experts, "_apply_gate"):  # transformers' default `act_fn(gate) * up`, or the model's own (gpt-oss)
        return experts._apply_gate(up)
    gate, up = up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def expert_output(experts: nn.Module, layout: ExpertsLayout, index: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `index`'s output for inputs `x` `[n, d]`, before any routing weight (float32)."""
    out = _linear(expert_intermediate(experts, layout, index, x), ExpertLinear(experts, index, "down_proj", layout))
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def routed_tokens(layout: ExpertsLayout, num_experts: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, list]:
    """Reads the router's decision from a call of the experts module.

    Returns:
        `(hidden [T, d], per_expert)` where `per_expert[e]` is `(token indices, routing weights)` of the tokens sent to
        expert `e`; for input-scaled layouts (Llama-4) `hidden` is `[E, T, d]`, already scaled, the routed tokens are
        the non-zero rows and their weights are 1.
    """
    values = list(args) + list(kwargs.values())
    hidden = values[0]
    if layout.input_scaled:
        hidden = hidden.reshape(num_experts, -1, hidden.shape[-1])
        per_expert = []
        for e in range(num_experts):
            rows = hidden[e].ne(0).any(dim=-1).nonzero().flatten()
            per_expert.append((rows, torch.ones(rows.numel(), device=hidden.device)))
        return hidden, per_expert
    index, weights = values[1], values[2]
    index = index.reshape(hidden.shape[0], -1)
    weights = weights.reshape(hidden.shape[0], -1)
    per_expert = []
    for e in range(num_experts):
        token, slot = (index == e).nonzero(as_tuple=True)
        per_expert.append((token, weights[token, slot]))
    return hidden, per_expert
