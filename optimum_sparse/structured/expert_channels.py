"""Expert-channel pruning (`PruningConfig(structure="expert-channels", method="expert-channels")`): the same number of
intermediate channels is removed from every routed expert of every MoE block, so the config's single expert width
(`moe_intermediate_size`, or `intermediate_size` for Mixtral-like models) describes the pruned model and stock
`from_pretrained` reloads it.

1. Plan (every check before any change): the fused experts module and router of every decoder block (the engine's
   layout table, `optimum_sparse.engine.experts`); one expert width `f` everywhere; `k = f − round(sparsity·f)` kept
   channels, rounded to `multiple_of`; the config field holding `f` (by model type, else the field equal to `f`),
   verified by building the model from the updated config on the meta device: exactly the expert tensors must change
   shape. A shared expert sized by the same field (DeepSeek-V2/V3: `n_shared_experts · moe_intermediate_size`;
   Llama-4: `intermediate_size`) is a plain gated MLP and is pruned with it to the same fraction (`ratio · k` channels,
   scored on every token, unweighted, since it sees every token); any other tensor the field sizes is refused, naming it.
2. Scores, block by block (`optimum_sparse.structured.moe_runner`: on the outputs of the already pruned blocks, offloaded
   blocks onloaded, sums added over processes, resumable): a hook on the block's experts module reads the routing the model computed
   (`routed_tokens`) and each expert's intermediate activation on its tokens with the model's own code
   (`expert_intermediate`); per expert and channel the `w²`-weighted sums `Σw²`, `Σw²a`, `Σw²a²` and the token count.
   The method (`optimum_sparse.methods.expert_channels`) turns them into scores; under-calibrated experts are scored
   by weight magnitude (recorded).
3. Slicing: each expert keeps its own `k` channels: the matching gate and up rows of `gate_up_proj` (`[gate; up]`
   halves, or gpt-oss's interleaved pairs, and their biases), the columns of `down_proj` (its bias is per output and
   stays); the experts module's width attributes (`intermediate_dim`, `intermediate_size`, `expert_dim`) and the
   config field are updated. Shared experts sized by their own field (Qwen2-MoE, Qwen3-Next) and dense blocks are left
   alone (plain MLPs: `structure="channels"` prunes them).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ..engine.checkpoint import CheckpointMismatchError
from ..engine.distributed import all_reduce_sum
from ..engine.experts import ExpertLinear, ExpertsLayout, expert_intermediate, routed_tokens
from ..engine.sequential import PruningReport
from ..utils import forward_batches
from .experts import MoELayer, find_moe_layers
from .moe_runner import MoECheckpoint, MoEStructure

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig

__all__ = ["ChannelPlan", "ChannelSums", "plan_expert_channels", "collect_channel_sums", "slice_expert_channels",
           "run_expert_channels", "ExpertChannelStructure", "EXPERT_WIDTH_FIELDS"]

logger = logging.getLogger(__name__)

# config field holding the routed experts' intermediate width, by model type (others: a candidate equal to the width)
EXPERT_WIDTH_FIELDS = {
    "mixtral": "intermediate_size", "granitemoe": "intermediate_size", "phimoe": "intermediate_size",
    "gpt_oss": "intermediate_size", "olmoe": "intermediate_size", "llama4_text": "intermediate_size",
    "qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size", "qwen3_next": "moe_intermediate_size",
    "deepseek_v2": "moe_intermediate_size", "deepseek_v3": "moe_intermediate_size",
}
_WIDTH_NAMES = ("moe_intermediate_size", "intermediate_size", "expert_dim")
_MODULE_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim")
_MAX_RECORDED = 100_000  # removed channel indices are written to the report up to this many per block


@dataclass
class ChannelPlan:
    """Everything checked before any weight changes."""

    layers: list  # `MoELayer` of every MoE block
    width: int  # intermediate channels per expert before
    keep: int  # channels kept per expert
    width_field: str
    min_tokens: int
    skipped_blocks: list = field(default_factory=list)  # dense blocks, by index
    skipped_modules: list = field(default_factory=list)  # shared experts left alone, by name
    coupled: list = field(default_factory=list)  # `SharedMLP`s sized by the same config field: pruned with the experts


@dataclass
class SharedMLP:
    """A shared expert (gated MLP of `nn.Linear`s) whose width is `ratio ×` the routed experts' config field."""

    name: str
    module: nn.Module
    ratio: int

    @property
    def width(self) -> int:
        return self.module.down_proj.in_features


@dataclass
class ChannelSums:
    """Routed sums of one MoE block's experts (float64): tokens `[E]`, `Σw²` `[E]`, `Σw²a` and `Σw²a²` `[E, f]`."""

    tokens: torch.Tensor
    s0: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    @classmethod
    def zeros(cls, num_experts: int, width: int) -> "ChannelSums":
        return cls(torch.zeros(num_experts, dtype=torch.long), torch.zeros(num_experts, dtype=torch.float64),
                   torch.zeros(num_experts, width, dtype=torch.float64),
                   torch.zeros(num_experts, width, dtype=torch.float64))


def _width(layer: MoELayer) -> int:
    return ExpertLinear(layer.experts, 0, "down_proj", layer.layout).in_features


def _up_rows(layout: ExpertsLayout, width: int) -> torch.Tensor:
    """`[f, r]`: the rows of the up projection's `[out, in]` view that carry channel `j` (gate then up, when gated)."""
    j = torch.arange(width)
    if not layout.gated:
        return j[:, None]
    if layout.interleaved:  # gpt-oss: gate at 2j, up at 2j + 1
        return torch.stack([2 * j, 2 * j + 1], dim=1)
    return torch.stack([j, width + j], dim=1)


def _kept_rows(layout: ExpertsLayout, width: int, keep: torch.Tensor) -> torch.Tensor:
    rows = _up_rows(layout, width)[keep]
    # `[gate; up]` halves stay halves; interleaved pairs stay pairs
    return rows.flatten() if layout.interleaved or not layout.gated else rows.t().flatten()


def _expert_tensors(layer: MoELayer) -> dict[str, torch.Tensor]:
    names = list(layer.layout.projections)
    if layer.layout.bias:
        names.append(f"{layer.layout.up_name}_bias")
    return {f"{layer.name}.{n}": getattr(layer.experts, n) for n in names}


def _new_shapes(layer: MoELayer, keep: int) -> dict[str, tuple]:
    """The shapes of the experts module's sliced tensors with `keep` channels per expert."""
    layout, width = layer.layout, _width(layer)
    out = {}
    for name, tensor in _expert_tensors(layer).items():
        shape = list(tensor.shape)
        if name.endswith("down_proj"):
            shape[1 if layout.transposed else 2] = keep
        else:  # up projection or its bias: its output dimension
            dim = 1 if name.endswith("_bias") or not layout.transposed else 2
            shape[dim] = shape[dim] // width * keep
        out[name] = tuple(shape)
    return out


def _shared_mlps(layer: MoELayer, width: int) -> list[SharedMLP]:
    """The shared experts beside `layer`'s experts that are gated MLPs of `nn.Linear`s with a multiple of `width`."""
    prefix = layer.name.rpartition(".")[0]
    found = []
    for name, module in layer.moe.named_children():
        if not name.startswith("shared_expert") or name == "shared_expert_gate":
            continue
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
                and module.down_proj.in_features % width == 0:
            found.append(SharedMLP(f"{prefix}.{name}", module, module.down_proj.in_features // width))
    return found


def _shared_shapes(shared: SharedMLP, keep: int) -> dict[str, tuple]:
    new = shared.ratio * keep
    out = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        linear = getattr(shared.module, proj)
        out[f"{shared.name}.{proj}.weight"] = (linear.out_features, new) if proj == "down_proj" else \
            (new, linear.in_features)
        if linear.bias is not None:
            out[f"{shared.name}.{proj}.bias"] = tuple(linear.bias.shape) if proj == "down_proj" else (new,)
    return out


def _check_config_field(model: nn.Module, layers: list, width: int, keep: int) -> tuple[str, list]:
    """The config field holding the expert width, verified on a meta-device model built from the updated config:
    exactly the expert tensors change shape, and the shared experts that the same field sizes (returned, to be
    pruned with them). Returns `(field, coupled shared experts)`; raises `ValueError` naming what differs."""
    from transformers import AutoModelForCausalLM

    mconfig = model.config
    candidates = [EXPERT_WIDTH_FIELDS[mconfig.model_type]] if mconfig.model_type in EXPERT_WIDTH_FIELDS else [
        n for n in _WIDTH_NAMES if getattr(mconfig, n, None) == width]
    candidates = [n for n in candidates if getattr(mconfig, n, None) == width]
    if not candidates:
        raise ValueError(f"model_type={mconfig.model_type!r}: no config field holds the expert width {width} (looked "
                         f"for {list(_WIDTH_NAMES)}); the pruned model could not be described by its config.")
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for layer in layers:
        expected.update(_new_shapes(layer, keep))
    problems = {}
    for name in candidates:
        new_config = copy.deepcopy(mconfig)
        setattr(new_config, name, keep)
        try:
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(new_config)
        except Exception as err:  # noqa: BLE001 - any failure means the field cannot be verified
            problems[name] = f"building the model from the updated config failed ({err})"
            continue
        shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}
        wrong = sorted(n for n in set(shapes) | set(expected) if shapes.get(n) != expected.get(n))
        if not wrong:
            return name, []
        coupled = [s for layer in layers for s in _shared_mlps(layer, width)
                   if any(n.startswith(f"{s.name}.") for n in wrong)]
        with_shared = dict(expected)
        for shared in coupled:
            with_shared.update(_shared_shapes(shared, keep))
        wrong = sorted(n for n in set(shapes) | set(with_shared) if shapes.get(n) != with_shared.get(n))
        if coupled and not wrong:
            return name, coupled
        problems[name] = f"it also sizes {wrong[:4]}{' ...' if len(wrong) > 4 else ''}"
    raise ValueError(f"model_type={mconfig.model_type!r}: no config field describes the routed experts alone: "
                     + "; ".join(f"{k}: {v}" for k, v in problems.items())
                     + ". Expert-channel pruning would give a model stock transformers cannot reload.")


def plan_expert_channels(model: nn.Module, config: "PruningConfig") -> ChannelPlan:
    """Finds the MoE blocks and checks the pruning is possible; raises `ValueError` (naming what) before any change."""
    from ..methods.expert_channels import DEFAULT_MIN_TOKENS

    layers, dense, blocks_path = find_moe_layers(model, "expert-channels", " (use structure='channels')")
    widths = {_width(layer) for layer in layers}
    if len(widths) != 1:
        raise ValueError(f"MoE blocks have different expert widths {sorted(widths)}; one config field cannot hold them.")
    width = widths.pop()
    keep = width - round(config.sparsity * width)
    multiple = config.multiple_of
    if width % multiple == 0:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
    if not 0 < keep < width:
        raise ValueError(f"PruningConfig.sparsity={config.sparsity} of {width} channels per expert keeps {keep} "
                         f"(rounded to multiple_of={multiple}); nothing would be removed, or everything.")
    width_field, coupled = _check_config_field(model, layers, width, keep)
    coupled_names = {s.name for s in coupled}
    shared = [f"{blocks_path}.{layer.index}.{n}" for layer in layers for n, _ in layer.moe.named_children()
              if n.startswith("shared_expert") and n != "shared_expert_gate"
              and f"{blocks_path}.{layer.index}.{n}" not in coupled_names]
    min_tokens = config.min_expert_tokens if config.min_expert_tokens is not None else DEFAULT_MIN_TOKENS
    return ChannelPlan(layers=layers, width=width, keep=keep, width_field=width_field, min_tokens=min_tokens,
                       skipped_blocks=dense, skipped_modules=shared, coupled=coupled)


@torch.no_grad()
def _accumulate(layer: MoELayer, sums: ChannelSums, args: tuple, kwargs: dict) -> None:
    layout = layer.layout
    hidden, per_expert = routed_tokens(layout, layer.num_experts, args, kwargs)
    if not layout.input_scaled:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    for e, (rows, weights) in enumerate(per_expert):
        if rows.numel() == 0:
            continue
        x = hidden[e, rows] if layout.input_scaled else hidden[rows]
        a = expert_intermediate(layer.experts, layout, e, x).to("cpu", torch.float64)
        w2 = weights.to("cpu", torch.float64).pow(2).unsqueeze(-1)  # Llama-4: 1 (inputs already scaled)
        sums.tokens[e] += rows.numel()
        sums.s0[e] += float(w2.sum())
        sums.s1[e] += (w2 * a).sum(dim=0)
        sums.s2[e] += (w2 * a * a).sum(dim=0)


def _sums_hooks(layer: MoELayer, sums: ChannelSums, coupled: list, shared_sums: list) -> list:
    """Hooks that add every call of `layer`'s experts module to `sums` and every call of the coupled shared experts
    (`coupled`, one "expert" each, unweighted: they see every token) to `shared_sums`. Returns the handles."""

    def shared_hook(total: ChannelSums):
        def fn(module, args):
            a = args[0].reshape(-1, args[0].shape[-1]).to("cpu", torch.float64)  # the shared expert's activation
            total.tokens[0] += a.shape[0]
            total.s0[0] += a.shape[0]
            total.s1[0] += a.sum(dim=0)
            total.s2[0] += a.pow(2).sum(dim=0)
        return fn

    def hook(module, args, kwargs, output):
        _accumulate(layer, sums, args, kwargs)

    handles = [layer.experts.register_forward_hook(hook, with_kwargs=True)]
    handles += [s.module.down_proj.register_forward_pre_hook(shared_hook(t)) for s, t in zip(coupled, shared_sums)]
    return handles


def _coupled_of(plan: ChannelPlan, layer: MoELayer) -> list:
    children = {id(m) for m in layer.moe.children()}
    return [s for s in plan.coupled if id(s.module) in children]


def collect_channel_sums(model: nn.Module, plan: ChannelPlan, input_ids: torch.Tensor, batch_size: int = 8,
                         progress: bool = True) -> tuple[list[ChannelSums], list[ChannelSums]]:
    """The routed sums of every MoE block (`plan.layers` order) and the unweighted sums of every coupled shared expert
    (`plan.coupled` order, one "expert" each) from one pass of `input_ids` through the dense `model` (the runner
    collects them block by block instead, on the pruned predecessors' outputs)."""
    sums = [ChannelSums.zeros(layer.num_experts, plan.width) for layer in plan.layers]
    shared_sums = {id(s.module): ChannelSums.zeros(1, s.width) for s in plan.coupled}
    handles = []
    for layer, layer_sums in zip(plan.layers, sums):
        coupled = _coupled_of(plan, layer)
        handles += _sums_hooks(layer, layer_sums, coupled, [shared_sums[id(s.module)] for s in coupled])
    forward_batches(model, input_ids, batch_size, handles, "Scoring expert channels", progress)
    return sums, [shared_sums[id(s.module)] for s in plan.coupled]


@torch.no_grad()
def slice_shared_mlp(shared: SharedMLP, keep: torch.Tensor) -> list[str]:
    """Keeps channels `keep` (sorted) of a shared expert: rows of `gate_proj`/`up_proj`, columns of `down_proj`."""
    sliced, old = [], shared.width
    for proj in ("gate_proj", "up_proj", "down_proj"):
        linear = getattr(shared.module, proj)
        index = keep.to(linear.weight.device)
        dim = 1 if proj == "down_proj" else 0
        linear.weight = nn.Parameter(linear.weight.detach().index_select(dim, index).contiguous(),
                                     requires_grad=linear.weight.requires_grad)
        if linear.bias is not None and proj != "down_proj":
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).contiguous(),
                                       requires_grad=linear.bias.requires_grad)
        setattr(linear, "in_features" if dim else "out_features", keep.numel())
        sliced.append(f"{shared.name}.{proj}")
    if getattr(shared.module, "intermediate_size", None) == old:
        shared.module.intermediate_size = keep.numel()
    return sliced


@torch.no_grad()
def slice_expert_channels(layer: MoELayer, keep: torch.Tensor) -> list[str]:
    """Keeps channels `keep[e]` (`[E, k]`, each row sorted) of every expert of one MoE block; returns the sliced
    tensors' names."""
    layout, width = layer.layout, _width(layer)
    k = keep.shape[1]
    rows = torch.stack([_kept_rows(layout, width, keep[e]) for e in range(keep.shape[0])])  # [E, r·k]
    experts, sliced = layer.experts, []

    def gather(name: str, dim: int, index: torch.Tensor) -> None:
        param = getattr(experts, name)
        shape = list(param.shape)
        shape[dim] = index.shape[1]
        view = [index.shape[0]] + [1] * (param.dim() - 1)
        view[dim] = index.shape[1]
        full = index.to(param.device).view(view).expand(shape)
        new = torch.gather(param.detach(), dim, full).contiguous()
        setattr(experts, name, nn.Parameter(new, requires_grad=param.requires_grad))
        sliced.append(f"{layer.name}.{name}")

    gather(layout.up_name, 2 if layout.transposed else 1, rows)
    if layout.bias:
        gather(f"{layout.up_name}_bias", 1, rows)
    gather("down_proj", 1 if layout.transposed else 2, keep)
    for attribute in _MODULE_WIDTH_ATTRS:
        value = getattr(experts, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value == width:
            setattr(experts, attribute, k)
    return sliced


def _choose_shared(method, shared: SharedMLP, sums: ChannelSums, keep: int, min_tokens: int) -> tuple[torch.Tensor,
                                                                                                       bool]:
    """`(kept channels of a shared expert, scored by magnitude)`: `ratio · keep` of them, scored on every token."""
    down = shared.module.down_proj.weight.detach().to("cpu", torch.float64)
    if int(sums.tokens[0]) < min_tokens:
        up = torch.stack([shared.module.gate_proj.weight.detach(), shared.module.up_proj.weight.detach()], dim=1)
        scores = method.magnitude_scores(down, up.to("cpu"))
    else:
        scores = method.channel_scores(down, float(sums.s0[0]), sums.s1[0], sums.s2[0])
    if not torch.isfinite(scores).all():
        raise FloatingPointError(f"{shared.name}: non-finite channel scores.")
    return method.select(scores, shared.ratio * keep), int(sums.tokens[0]) < min_tokens


def _choose(method, layer: MoELayer, sums: ChannelSums, keep: int, min_tokens: int) -> tuple[torch.Tensor, list]:
    """`([E, keep] kept channels, experts scored by magnitude)`."""
    width = _width(layer)
    rows = _up_rows(layer.layout, width)
    kept, fallback = [], []
    for e in range(layer.num_experts):
        down = ExpertLinear(layer.experts, e, "down_proj", layer.layout).weight.detach().to("cpu", torch.float64)
        if int(sums.tokens[e]) < min_tokens:
            up = ExpertLinear(layer.experts, e, layer.layout.up_name, layer.layout).weight.detach().to("cpu")
            scores = method.magnitude_scores(down, up[rows])
            fallback.append(e)
        else:
            scores = method.channel_scores(down, float(sums.s0[e]), sums.s1[e], sums.s2[e])
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"{layer.name}: non-finite channel scores for expert {e}.")
        kept.append(method.select(scores, keep))
    return torch.stack(kept), fallback


def _prunable(plan: ChannelPlan) -> int:
    experts = sum(t.numel() for layer in plan.layers for t in _expert_tensors(layer).values())
    return experts + sum(getattr(s.module, p).weight.numel() for s in plan.coupled
                         for p in ("gate_proj", "up_proj", "down_proj"))


class ExpertChannelStructure(MoEStructure):
    """Expert-channel pruning for `run_moe_structured`: per MoE block the routed `ChannelSums` (and the coupled shared
    experts' sums), each expert's kept channels, the slice of the experts module and the shared experts."""

    structure = "expert-channels"
    diagnostics_key = "expert_channels"
    desc = "Pruning expert channels"

    def prunable(self) -> int:
        return _prunable(self.plan)

    def collect(self, layer):
        coupled = _coupled_of(self.plan, layer)
        sums = (ChannelSums.zeros(layer.num_experts, self.plan.width), [ChannelSums.zeros(1, s.width) for s in coupled])
        return sums, _sums_hooks(layer, sums[0], coupled, sums[1])

    def all_reduce(self, stats):
        for sums in [stats[0], *stats[1]]:
            for tensor in (sums.tokens, sums.s0, sums.s1, sums.s2):
                all_reduce_sum(tensor)

    def decide(self, layer, stats):
        plan = self.plan
        sums, shared_sums = stats
        keep, fallback = _choose(self.method, layer, sums, plan.keep, plan.min_tokens)
        removed = [sorted(set(range(plan.width)) - set(row.tolist())) for row in keep]
        entry = {"index": layer.index, "experts": layer.name, "channels_before": plan.width,
                 "channels_after": plan.keep, "tokens": [int(t) for t in sums.tokens.tolist()],
                 "routing_mass_sq": sums.s0.tolist(), "magnitude_fallback": fallback}
        if len(removed) * len(removed[0]) <= _MAX_RECORDED:
            entry["removed_channels"] = removed
        else:
            entry["removed_channels"] = f"omitted ({len(removed)} experts × {len(removed[0])} channels)"
        if fallback:
            logger.warning("%s: experts %s had fewer than %d routed tokens; scored by weight magnitude.", layer.name,
                           fallback, plan.min_tokens)
        decision, entries = {"kept_channels": keep}, [entry]
        for i, (shared, s) in enumerate(zip(_coupled_of(plan, layer), shared_sums)):
            kept, magnitude = _choose_shared(self.method, shared, s, plan.keep, plan.min_tokens)
            decision[f"shared_{i}"] = kept
            entries.append({"shared_expert": shared.name, "channels_before": shared.width,
                            "channels_after": kept.numel(), "tokens": int(s.tokens[0]),
                            "magnitude_fallback": magnitude,
                            "removed_channels": sorted(set(range(shared.width)) - set(kept.tolist()))})
        return decision, entries

    def apply(self, layer, decision):
        plan = self.plan
        keep, coupled = decision.get("kept_channels"), _coupled_of(plan, layer)
        expected = {"kept_channels", *(f"shared_{i}" for i in range(len(coupled)))}
        if set(decision) != expected or tuple(keep.shape) != (layer.num_experts, plan.keep) \
                or int(keep.max()) >= _width(layer):
            raise CheckpointMismatchError(f"{layer.name}: the saved kept channels ({sorted(decision)}) do not fit the "
                                          f"model's {layer.num_experts} experts × {_width(layer)} channels.")
        old_shapes = {n: tuple(t.shape) for n, t in _expert_tensors(layer).items()}
        slice_expert_channels(layer, keep)
        shapes = [(n, old_shapes[n], tuple(t.shape)) for n, t in _expert_tensors(layer).items()]
        for i, shared in enumerate(coupled):
            before = {p: tuple(getattr(shared.module, p).weight.shape) for p in ("gate_proj", "up_proj", "down_proj")}
            slice_shared_mlp(shared, decision[f"shared_{i}"].to(torch.long))
            shapes += [(f"{shared.name}.{p}", shape, tuple(getattr(shared.module, p).weight.shape))
                       for p, shape in before.items()]
        return shapes

    def tensors(self, layer):
        shared = [getattr(s.module, p).weight for s in _coupled_of(self.plan, layer)
                  for p in ("gate_proj", "up_proj", "down_proj")]
        return [*_expert_tensors(layer).values(), *shared]

    def config_update(self):
        return self.plan.width_field, self.plan.keep

    def details(self, report):
        plan = self.plan
        logger.info("Kept %d of %d channels in every expert; left alone: dense blocks %s, %s.", plan.keep, plan.width,
                    plan.skipped_blocks, plan.skipped_modules or "no shared experts")
        fallback = {b["experts"]: b["magnitude_fallback"] for b in report.blocks
                    if "experts" in b and b["magnitude_fallback"]}
        shared = {b["shared_expert"]: {"channels_before": b["channels_before"], "channels_after": b["channels_after"]}
                  for b in report.blocks if "shared_expert" in b}
        return {"channels_before": plan.width, "channels_after": plan.keep, "removed_per_expert": plan.width - plan.keep,
                "skipped_modules": plan.skipped_modules, "shared_experts_pruned": shared,
                "min_expert_tokens": plan.min_tokens, "magnitude_fallback": fallback}


def run_expert_channels(model: nn.Module, method, config: "PruningConfig", input_ids: Optional[torch.Tensor],
                        progress: bool = True, plan: Optional[ChannelPlan] = None,
                        checkpoint: Optional["MoECheckpoint"] = None) -> tuple[PruningReport, dict]:
    """Scores and removes expert channels in place, block by block (`run_moe_structured`); returns `(report, summary)`
    (`summary` is also stored as `model.config.structured_pruning`)."""
    return ExpertChannelStructure.run(model, method, config, input_ids, plan or plan_expert_channels(model, config),
                                      progress, checkpoint)
