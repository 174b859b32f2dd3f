"""Whole-expert removal (`PruningConfig(structure="experts")`): the lowest-scoring experts of every MoE block are cut
out of the fused expert parameters and the router, and the config's expert count is updated.

1. Plan (every check before any change): in every decoder block, the fused experts module found by the engine's
   layout table (`optimum_sparse.engine.experts.find_experts_modules`: concatenated, gpt-oss, Llama-4 or a generic
   fused layout) and the router beside it (`gate` / `router`, weight `[E, d]`); the same `E` everywhere;
   `round(sparsity · E)` experts to remove per block, at least one, leaving at least `num_experts_per_tok` (and, for
   group-limited routing such as DeepSeek-V3's, the same count from every group).
2. Scores, block by block (`optimum_sparse.structured.moe_runner`: on the outputs of the already pruned blocks, offloaded
   blocks onloaded, statistics summed over processes, resumable): a hook on the block's experts module reads the
   routing the model itself computed (`routed_tokens`: token → experts, weights) and computes each expert's output on its tokens
   with the model's own code (`expert_output`), which yields its weighted output `w_te · E_e(x_t)` (Llama-4, whose
   experts take router-scaled inputs: `E_e(w_te · x_t)`). Per expert: tokens routed, routed mass `Σ_t w_te`, and the
   contribution `Σ_t ‖w_te · E_e(x_t)‖₂` (the routed mass times the mass-weighted mean output norm). The method
   (`optimum_sparse.methods.expert_removal`) turns them into the kept experts.
3. Removal: every parameter and buffer of the experts module and the router whose first dimension is `E` is sliced
   to the kept experts in their original order (router rows, router bias, `e_score_correction_bias`, expert biases),
   which renumbers the router's outputs; modules' `num_experts`-like attributes and the config's expert count
   (`num_local_experts`, `num_experts`, `n_routed_experts`, by model type) are updated. Every MoE block keeps the
   same number of experts, so the stock config describes the model and stock `from_pretrained` reloads it. The
   pruned block's outputs are the next block's calibration inputs.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ..engine.architectures import find_blocks, get_architecture
from ..engine.checkpoint import CheckpointMismatchError
from ..engine.distributed import all_reduce_scalar, all_reduce_sum
from ..engine.experts import (
    ExpertsLayout, expert_output, experts_routers, find_experts_modules, layout_count, routed_tokens,
)
from ..engine.offload import offload_hook
from ..engine.sequential import PruningReport
from ..utils import forward_batches
from .moe_runner import MoECheckpoint, MoEStructure

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig

__all__ = ["MoELayer", "ExpertStats", "ExpertPlan", "find_moe_layers", "plan_expert_removal", "collect_expert_stats",
           "remove_experts", "run_expert_removal", "ExpertRemovalStructure", "EXPERT_COUNT_FIELDS"]

logger = logging.getLogger(__name__)

# config field holding the routed-expert count, by model type (others: the first of these names the config has)
EXPERT_COUNT_FIELDS = {
    "mixtral": "num_local_experts", "granitemoe": "num_local_experts", "granitemoeshared": "num_local_experts",
    "phimoe": "num_local_experts", "gpt_oss": "num_local_experts", "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts", "qwen3_next": "num_experts", "olmoe": "num_experts",
    "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts", "llama4_text": "num_local_experts",
}
_COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass
class MoELayer:
    """One MoE block: its experts module, router, and where they sit."""

    index: int
    name: str  # full name of the experts module
    experts: nn.Module
    router: nn.Module
    router_name: str
    moe: nn.Module  # the module holding both (e.g. `mlp`)
    num_experts: int
    num_groups: int = 1  # group-limited routing (DeepSeek-V3 `n_group`)
    experts_attr: str = "experts"  # attribute names of the experts module and the router inside `moe`
    router_attr: str = "gate"
    layout: Optional[ExpertsLayout] = None  # the engine's storage layout (`optimum_sparse.engine.experts`)


@dataclass
class ExpertStats:
    """Calibration statistics of one MoE block's experts (float64 sums).

    Attributes:
        tokens: tokens routed to each expert `[E]` (top-k slots counted).
        mass: `Σ_t w_te`, the routing weight each expert received `[E]`.
        contribution: `Σ_t ‖w_te · E_e(x_t)‖₂`, the norm each expert added to the block output `[E]`.
    """

    tokens: torch.Tensor
    mass: torch.Tensor
    contribution: torch.Tensor
    inputs: Optional[list] = field(default=None, repr=False)  # the MoE module's inputs (reconstruction criterion)

    @classmethod
    def zeros(cls, num_experts: int) -> "ExpertStats":
        return cls(*(torch.zeros(num_experts, dtype=torch.float64) for _ in range(3)))

    def to_dict(self) -> dict:
        return {"tokens": [int(t) for t in self.tokens.tolist()], "mass": self.mass.tolist(),
                "contribution": self.contribution.tolist()}


@dataclass
class ExpertPlan:
    """Everything checked before any weight changes."""

    layers: list
    num_experts: int  # experts per MoE block before the removal
    remove: int  # experts removed per MoE block
    count_field: str
    top_k: Optional[int]
    skipped_blocks: list = field(default_factory=list)  # dense blocks (no experts), by index

    @property
    def kept(self) -> int:
        return self.num_experts - self.remove


def _find_moe(block: nn.Module, prefix: str, index: int) -> Optional[MoELayer]:
    found = find_experts_modules(block)  # the engine's layout table: one place per layout
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{prefix}: several fused expert modules ({list(found)}); expert removal expects one.")
    ((name, (experts, layout)),) = found.items()
    num_experts = layout_count(experts, layout)
    parent_name = name.rpartition(".")[0]
    moe = block.get_submodule(parent_name) if parent_name else block
    routers = experts_routers(moe, num_experts)
    if len(routers) != 1:
        raise ValueError(f"{prefix}.{parent_name}: no router ('gate' or 'router' with a weight of {num_experts} rows) "
                         "beside the experts; expert removal cannot renumber the routing.")
    if not layout.input_scaled and len(inspect.signature(experts.forward).parameters) < 3:
        raise ValueError(f"{prefix}.{name} ({type(experts).__name__}): its forward takes no routing "
                         "(hidden_states, indices, weights); expert removal does not support this layout yet.")
    router_name, router = routers[0]
    groups = int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1)
    return MoELayer(index=index, name=f"{prefix}.{name}", experts=experts, router=router,
                    router_name=f"{prefix}.{parent_name}.{router_name}" if parent_name else f"{prefix}.{router_name}",
                    moe=moe, num_experts=num_experts, num_groups=groups, experts_attr=name.rpartition(".")[2],
                    router_attr=router_name, layout=layout)


def find_moe_layers(model: nn.Module, structure: str, hint: str = "") -> tuple[list, list, str]:
    """`(MoE layers, dense block indices, blocks path)` of a model; raises `ValueError` when it has no fused experts."""
    spec = get_architecture(model)
    layers, dense = [], []
    for index, block in enumerate(find_blocks(model, spec)):
        layer = _find_moe(block, f"{spec.blocks}.{index}", index)
        (layers.append(layer) if layer is not None else dense.append(index))
    if not layers:
        raise ValueError(f"PruningConfig.structure={structure!r}: {type(model).__name__} has no fused expert parameters "
                         "(gate_up_proj or up_proj, down_proj [E, ...]) in its decoder blocks; it is not a mixture of "
                         f"experts{hint}.")
    return layers, dense, spec.blocks


def plan_expert_removal(model: nn.Module, config: "PruningConfig") -> ExpertPlan:
    """Finds the MoE blocks and checks the removal is possible; raises `ValueError` (naming what) before any change."""
    layers, dense, _ = find_moe_layers(model, "experts")
    counts = {layer.num_experts for layer in layers}
    if len(counts) != 1:
        raise ValueError(f"MoE blocks have different expert counts {sorted(counts)}; expert removal expects one.")
    num_experts = counts.pop()
    mconfig = model.config
    count_field = EXPERT_COUNT_FIELDS.get(mconfig.model_type)
    if count_field is None:
        count_field = next((n for n in _COUNT_NAMES if getattr(mconfig, n, None) == num_experts), None)
    if count_field is None or getattr(mconfig, count_field, None) != num_experts:
        raise ValueError(f"model_type={mconfig.model_type!r}: no config field holds the expert count {num_experts} "
                         f"(looked for {list(_COUNT_NAMES)}); the reloaded model would not match.")
    remove = round(config.sparsity * num_experts)
    if remove < 1:
        raise ValueError(f"PruningConfig.sparsity={config.sparsity} of {num_experts} experts removes none "
                         f"(round({config.sparsity} × {num_experts}) = 0); use at least {0.5 / num_experts:.3f}.")
    kept = num_experts - remove
    top_k = getattr(mconfig, "num_experts_per_tok", None)
    if top_k is not None and kept < top_k:
        raise ValueError(f"Removing {remove} of {num_experts} experts leaves {kept}, fewer than num_experts_per_tok="
                         f"{top_k} (each token's experts); lower PruningConfig.sparsity.")
    for layer in layers:
        if layer.num_groups > 1 and config.method_kwargs.get("criterion") == "reconstruction":
            raise ValueError(f"{layer.router_name}: the 'reconstruction' criterion removes experts one at a time, which "
                             "group-limited routing cannot run (unequal groups); use 'contribution', 'mass' or "
                             "'frequency'.")
        if layer.num_groups > 1:
            if remove % layer.num_groups:
                raise ValueError(f"{layer.router_name}: routing picks among {layer.num_groups} expert groups; remove a "
                                 f"multiple of {layer.num_groups} experts (got {remove}) so every group stays equal.")
            per_group = kept // layer.num_groups
            topk_group = int(getattr(layer.router, "topk_group", 1) or 1)
            if per_group < 2 or (top_k is not None and per_group * topk_group < top_k):
                raise ValueError(f"{layer.router_name}: {per_group} experts per group left; group routing needs at "
                                 f"least 2 and {topk_group} groups × {per_group} >= num_experts_per_tok={top_k}.")
    return ExpertPlan(layers=layers, num_experts=num_experts, remove=remove, count_field=count_field, top_k=top_k, skipped_blocks=dense)


@torch.no_grad()
def _accumulate(layer: MoELayer, stats: ExpertStats, args: tuple, kwargs: dict,
                moe_input: Optional[torch.Tensor]) -> None:
    """Adds one call of the experts module: for each expert, its tokens, routing mass and weighted output norms, from
    the router's decision (`routed_tokens`) and the expert's output with the model's own code (`expert_output`).

    Llama-4's experts take inputs already scaled by the routing weight `w_te`: the expert's output is `E_e(w_te·x_t)`
    and `w_te = ‖w_te·x_t‖ / ‖x_t‖`, with `x_t` the MoE module's input (`moe_input`)."""
    layout = layer.layout
    hidden, per_expert = routed_tokens(layout, layer.num_experts, args, kwargs)
    if layout.input_scaled:
        x_norm = moe_input.reshape(-1, hidden.shape[-1]).to(torch.float64).norm(dim=-1)
    else:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    for e, (rows, weights) in enumerate(per_expert):
        if rows.numel() == 0:
            continue
        x = hidden[e, rows] if layout.input_scaled else hidden[rows]
        norms = expert_output(layer.experts, layout, e, x).to(torch.float64).norm(dim=-1)
        if layout.input_scaled:
            scale = x_norm[rows.to(x_norm.device)]
            weights = torch.where(scale > 0, x.to(torch.float64).norm(dim=-1) / scale.clamp_min(1e-300),
                                  torch.zeros_like(scale))
            contribution = norms.sum()
        else:
            weights = weights.to(torch.float64)
            contribution = (weights.abs().to(norms.device) * norms).sum()
        stats.tokens[e] += rows.numel()
        stats.mass[e] += float(weights.sum())
        stats.contribution[e] += float(contribution)


def _stats_hooks(layer: MoELayer, stats: ExpertStats, moe_inputs: Optional[list] = None) -> list:
    """Hooks that add every call of `layer`'s experts module to `stats` (`_accumulate`); `moe_inputs`: a list to fill
    with the MoE module's input batches (on the CPU). Returns the handles."""
    current: list = [None]  # the MoE module's input of the running call

    def pre_hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        current[0] = x
        if moe_inputs is not None:
            moe_inputs.append(x.detach().to("cpu"))

    def hook(module, args, kwargs, output):
        _accumulate(layer, stats, args, kwargs, current[0])
        current[0] = None

    handles = []
    if layer.layout.input_scaled or moe_inputs is not None:
        handles.append(layer.moe.register_forward_pre_hook(pre_hook, with_kwargs=True))
    handles.append(layer.experts.register_forward_hook(hook, with_kwargs=True))
    return handles


@torch.no_grad()
def collect_expert_stats(model: nn.Module, plan: ExpertPlan, input_ids: torch.Tensor, batch_size: int = 8,
                         progress: bool = True, moe_inputs: Optional[list] = None) -> list[ExpertStats]:
    """Per-expert statistics of every MoE block (`plan.layers` order) from one pass of `input_ids` through the dense
    `model` (the runner collects them block by block instead, on the pruned predecessors' outputs).

    `moe_inputs`: a list to fill with, per MoE block, the list of its MoE module's input batches (on the CPU).
    """
    stats = [ExpertStats.zeros(layer.num_experts) for layer in plan.layers]
    if moe_inputs is not None:
        moe_inputs.extend([] for _ in plan.layers)
    handles = [h for i, layer in enumerate(plan.layers)
               for h in _stats_hooks(layer, stats[i], moe_inputs[i] if moe_inputs is not None else None)]
    forward_batches(model, input_ids, batch_size, handles, "Scoring experts", progress)
    return stats


def _slice_first_dim(module: nn.Module, num_experts: int, keep: torch.Tensor) -> list[str]:
    """Keeps rows `keep` of every direct parameter/buffer of `module` whose first dimension is `num_experts`."""
    sliced = []
    for name, param in list(module._parameters.items()):
        if param is not None and param.dim() >= 1 and param.shape[0] == num_experts:
            new = param.detach().index_select(0, keep.to(param.device)).contiguous()
            setattr(module, name, nn.Parameter(new, requires_grad=param.requires_grad))
            sliced.append(name)
    for name, buffer in list(module._buffers.items()):
        if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == num_experts:
            module._buffers[name] = buffer.index_select(0, keep.to(buffer.device)).contiguous()
            sliced.append(name)
    return sliced


@torch.no_grad()
def remove_experts(layer: MoELayer, keep: torch.Tensor) -> list[str]:
    """Keeps experts `keep` (indices, any order: kept sorted) of one MoE block; returns the sliced tensor names."""
    keep = keep.to(torch.long).sort().values
    old = layer.num_experts
    sliced = [f"{layer.name}.{n}" for n in _slice_first_dim(layer.experts, old, keep)]
    sliced += [f"{layer.router_name}.{n}" for n in _slice_first_dim(layer.router, old, keep)]
    for module in layer.moe.modules():
        for attribute in _COUNT_NAMES:
            if getattr(module, attribute, None) == old and isinstance(getattr(module, attribute), int):
                setattr(module, attribute, len(keep))
    if getattr(layer.router, "out_features", None) == old:  # routers that are nn.Linear subclasses
        layer.router.out_features = len(keep)
    layer.num_experts = len(keep)
    return sliced


def _moe_output(moe: nn.Module, x: torch.Tensor, device) -> torch.Tensor:
    out = moe(x.to(device))
    return (out[0] if isinstance(out, (tuple, list)) else out).to("cpu", torch.float64)


@torch.no_grad()
def reconstruction_choice(layer: MoELayer, inputs: list, remove: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Greedy reconstruction criterion: removes, one at a time, the expert whose removal (with the others already
    removed; the router re-routes their tokens) changes the MoE module's output least, relative error
    `Σ‖y_S − y‖² / Σ‖y‖²` over the calibration inputs, computed with the module's own forward on a pruned copy.

    Returns `(kept experts, each expert's error when removed alone (the scores, negated: higher = keep),
    [(expert, error after removing it), ...] in removal order)`.
    """
    device = getattr(layer.experts, layer.layout.up_name).device
    full = [_moe_output(layer.moe, x, device) for x in inputs]
    energy = all_reduce_scalar(sum(float(y.pow(2).sum()) for y in full))  # several processes: sums over all ranks

    # offloaded blocks: the copies share accelerate's offload storage instead of copying it (they run onloaded)
    shared = {id(h.weights_map): h.weights_map for h in (offload_hook(m) for m in layer.moe.modules()) if h is not None}

    def error(removed: list) -> float:
        moe = copy.deepcopy(layer.moe, memo=dict(shared))
        clone = MoELayer(layer.index, layer.name, getattr(moe, layer.experts_attr), getattr(moe, layer.router_attr),
                         layer.router_name, moe, layer.num_experts, layer.num_groups, layout=layer.layout)
        keep = torch.tensor([e for e in range(layer.num_experts) if e not in removed])
        remove_experts(clone, keep)
        diff = all_reduce_scalar(sum(float((_moe_output(moe, x, device) - y).pow(2).sum())
                                     for x, y in zip(inputs, full)))
        return diff / energy if energy > 0 else 0.0

    alone = torch.tensor([error([e]) for e in range(layer.num_experts)], dtype=torch.float64)
    removed, path = [], []
    for step in range(remove):
        candidates = [e for e in range(layer.num_experts) if e not in removed]
        errors = alone[candidates].tolist() if step == 0 else [error(removed + [e]) for e in candidates]
        best = min(range(len(candidates)), key=lambda i: (errors[i], -candidates[i]))
        removed.append(candidates[best])
        path.append((candidates[best], errors[best]))
    keep = torch.tensor(sorted(set(range(layer.num_experts)) - set(removed)), dtype=torch.long)
    return keep, -alone, path


class ExpertRemovalStructure(MoEStructure):
    """Whole-expert removal for `run_moe_structured`: per MoE block the `ExpertStats` (and, for the reconstruction
    criterion, the MoE module's inputs), the kept experts, the slice of the experts module and the router."""

    structure = "experts"
    diagnostics_key = "expert_removal"
    desc = "Removing experts"

    def prunable(self) -> int:
        return sum(t.numel() for layer in self.plan.layers for _, t in _expert_tensors(self.model, layer))

    def collect(self, layer):
        stats = ExpertStats.zeros(layer.num_experts)
        if self.method.criterion == "reconstruction":
            stats.inputs = []
        return stats, _stats_hooks(layer, stats, stats.inputs)

    def all_reduce(self, stats):
        for tensor in (stats.tokens, stats.mass, stats.contribution):
            all_reduce_sum(tensor)

    def decide(self, layer, stats):
        path = None
        if stats.inputs is not None:
            keep, scores, path = reconstruction_choice(layer, stats.inputs, self.plan.remove)
            stats.inputs.clear()
        else:
            keep, scores = self.method.select_experts(stats, self.plan.remove, layer.num_groups)
        keep = keep.to(torch.long).sort().values
        removed = sorted(set(range(layer.num_experts)) - set(keep.tolist()))
        entry = {"index": layer.index, "experts": layer.name, "router": layer.router_name,
                 "removed_experts": removed, "kept_experts": keep.tolist(), "scores": scores.tolist(),
                 **stats.to_dict(), **({"reconstruction_path": [[e, err] for e, err in path]} if path else {})}
        return {"kept_experts": keep}, [entry]

    def apply(self, layer, decision):
        keep = decision["kept_experts"]
        if keep.dim() != 1 or keep.numel() != self.plan.kept or int(keep.max()) >= layer.num_experts:
            raise CheckpointMismatchError(f"{layer.name}: the saved kept experts {keep.tolist()} do not fit the "
                                          f"model's {layer.num_experts} experts.")
        old_shapes = {n: tuple(t.shape) for n, t in _expert_tensors(self.model, layer)}
        sliced = set(remove_experts(layer, keep))
        return [(name, old_shapes[name], tuple(t.shape)) for name, t in _expert_tensors(self.model, layer)
                if name in sliced]

    def tensors(self, layer):
        return [t for _, t in _expert_tensors(self.model, layer)]

    def config_update(self):
        return self.plan.count_field, self.plan.kept

    def details(self, report):
        plan = self.plan
        if plan.remove:
            logger.info("Removed %d of %d experts in each of %d MoE blocks.", plan.remove, plan.num_experts,
                        len(plan.layers))
        return {"experts_before": plan.num_experts, "experts_after": plan.kept, "removed_per_block": plan.remove,
                "removed_experts": {b["experts"]: b["removed_experts"] for b in report.blocks if "removed_experts" in b}}


def run_expert_removal(model: nn.Module, method, config: "PruningConfig", input_ids: Optional[torch.Tensor],
                       progress: bool = True, plan: Optional[ExpertPlan] = None,
                       checkpoint: Optional["MoECheckpoint"] = None) -> tuple[PruningReport, dict]:
    """Scores and removes experts in place, block by block (`run_moe_structured`); returns `(report, summary)`
    (`summary` is also stored as `model.config.structured_pruning`)."""
    plan = plan or plan_expert_removal(model, config)
    return ExpertRemovalStructure.run(model, method, config, input_ids, plan, progress, checkpoint)


def _expert_tensors(model: nn.Module, layer: MoELayer):
    for prefix, module in ((layer.name, layer.experts), (layer.router_name, layer.router)):
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            yield f"{prefix}.{name}", tensor
