"""The structured pruning loop: budgets, (optional) allocation pass, block-sequential pruning and shrinking.

1. Budgets: every block's heads and/or MLP channels become a `ModuleBudget`; the run removes
   `sparsity × (parameters of those linears)`, and checks before any change that this is possible.
2. Allocation: `uniform` needs nothing; `threshold`/`softmax` first run the dense model block by block, collect
   the method's comparable group scores, and turn them into kept counts per module; `PruningConfig.allocation=
   "search"` searches the kept counts instead (`structured.search`, Týr-style) and leaves the model dense again.
3. Pruning, block by block on the outputs of the already pruned blocks: statistics at the attention output
   projection's input → `method.select` → shrink the attention; then the same for the MLP on the new attention
   output; then the block's outputs feed the next block.
4. The new sizes go into `model.config` (stock fields when possible, else per-layer shapes, see `shrink`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ..engine.architectures import find_blocks, get_architecture
from ..engine.block import BlockJob, LayerReport
from ..engine.capture import BlockInputs
from ..engine.devices import is_offloaded
from ..engine.linears import in_features, read_weight
from ..engine.sequential import PruningReport, capture_inputs, walk_blocks
from ..allocation.structured import (ModuleBudget, allocate, allocation_record, check_feasible, pooled_common_sizes,
                         same_shapes_per_kind)
from .layout import HeadGeometry, StructuredLayout, get_structured_layout, head_geometry
from .scoring import InputStats
from .shrink import (count_parameters, finalize_config, out_features, shrink_channels, shrink_heads,
                     shrunk_layer_report)

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig
    from .base import StructuredMethod

__all__ = ["StructuredPlan", "plan_structured", "run_structured", "SUMMARY_KEY"]

logger = logging.getLogger(__name__)

SUMMARY_KEY = "structured_pruning"  # model.config attribute holding the achieved sizes and fractions


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


class StructuredPlan:
    """Everything checked before any weight changes: layout, geometry, budgets, linear shapes."""

    def __init__(self, model: nn.Module, config: "PruningConfig"):
        self.layout: StructuredLayout = get_structured_layout(model)
        self.model_type = model.config.model_type
        self.spec = get_architecture(model)
        self.blocks = find_blocks(model, self.spec)
        if any(is_offloaded(block) for block in self.blocks):
            raise ValueError("Structured pruning replaces linears and needs every block in memory (no disk/CPU "
                             "offload through accelerate); load the model without offloading.")
        self.geometry: HeadGeometry = head_geometry(model.config, self.layout)
        self.kinds = [k for k in ("heads", "channels") if k in config.structure.split("+")]
        self.modules: list[ModuleBudget] = []
        self.linears: dict[str, nn.Module] = {}
        for index, block in enumerate(self.blocks):
            for kind in self.kinds:
                self.modules.append(self._budget(index, block, kind, config.multiple_of))
        self.prunable = sum(m.params for m in self.modules)
        self.budget = config.sparsity * self.prunable
        check_feasible(self.modules, self.budget, config.sparsity, config.structure)
        if config.uniform_shapes:
            self._check_uniform_shapes(model, config)
        self.original_shapes = {
            name: (out_features(m), in_features(m), getattr(m, "bias", None) is not None)
            for name, m in self.linears.items()
        }
        self.model_params = count_parameters(model)

    def _check_uniform_shapes(self, model: nn.Module, config: "PruningConfig") -> None:
        model_type = model.config.model_type
        if "heads" in self.kinds and not self.layout.stock_heads:
            raise ValueError(
                f"PruningConfig.uniform_shapes=True with structure={config.structure!r}: the stock {model_type!r} "
                "config derives head_dim from hidden_size / num_attention_heads, so it cannot describe fewer heads. "
                "Use structure='channels', or per-layer shapes (uniform_shapes=False, loads with trust_remote_code).")
        if self.layout.mlp_field is None:
            raise ValueError(f"PruningConfig.uniform_shapes=True: no stock config field for the MLP width of "
                             f"{model_type!r}.")
        if not same_shapes_per_kind(self.modules):
            raise ValueError("PruningConfig.uniform_shapes=True: the blocks of this model already have different "
                             "head/channel counts (a model pruned with per-layer shapes); prune the original model.")

    def check_method(self, method: "StructuredMethod", config: "PruningConfig") -> None:
        """Checks that need the method (before any change): under `uniform_shapes`, a bias the method adds to an
        output projection must be expressible in the stock config."""
        if not (config.uniform_shapes and method.adds_output_bias()):
            return
        block = self.blocks[0]
        for kind in self.kinds:
            output = self.names(kind)[1]
            if getattr(block.get_submodule(output), "bias", None) is None and self.layout.bias_field(output) is None:
                raise ValueError(
                    f"PruningConfig.uniform_shapes=True: {config.method!r} adds a bias to {output} (its compensation), "
                    f"and the stock {self.model_type!r} config has no field that gives it one. Use "
                    "uniform_shapes=False (per-layer form), another structure kind, or a method without bias "
                    "compensation (wanda-structured; structprune with method_kwargs={'bias_correction': False}).")

    def module_names(self) -> list[str]:
        """A name per module, in `modules` order: `"<blocks>.<i>.heads"` / `"<blocks>.<i>.channels"`."""
        return [f"{self.spec.blocks}.{m.key[0]}.{m.key[1]}" for m in self.modules]

    def names(self, kind: str) -> tuple[tuple, str]:
        """`(input projections, output projection)` of a kind, relative to the block."""
        if kind == "heads":
            return self.layout.attention_inputs, self.layout.o
        return self.layout.mlp_inputs, self.layout.mlp_output

    def width(self, kind: str) -> int:
        return self.geometry.group_width if kind == "heads" else 1

    def _budget(self, index: int, block: nn.Module, kind: str, multiple_of: int) -> ModuleBudget:
        inputs, output = self.names(kind)
        out_module = block.get_submodule(output)
        groups = in_features(out_module) // self.width(kind)
        if groups * self.width(kind) != in_features(out_module):
            raise ValueError(f"{self.spec.blocks}.{index}.{output}: {in_features(out_module)} inputs are not whole "
                             f"KV groups of {self.width(kind)} (head_dim × query heads per KV head).")
        cost = (in_features(out_module) // groups) * out_features(out_module)
        params = _params(out_module)
        for name in inputs:
            module = block.get_submodule(name)
            bias = getattr(module, "bias", None) is not None
            rows = out_features(module) // groups
            if kind == "heads" and self.geometry.shared_kv:  # only query rows go; the one key/value head stays
                rows = self.geometry.head_dim if name != self.layout.k and name != self.layout.v else 0
            cost += rows * (in_features(module) + int(bias))
            params += _params(module)
            self.linears[f"{self.spec.blocks}.{index}.{name}"] = module
        self.linears[f"{self.spec.blocks}.{index}.{output}"] = out_module
        step = 1 if kind == "heads" else multiple_of
        return ModuleBudget(key=(index, kind), groups=groups, cost=cost, step=step, params=params)


def plan_structured(model: nn.Module, config: "PruningConfig") -> StructuredPlan:
    """Validates a structured run against `model` (raises `ValueError` before any change)."""
    return StructuredPlan(model, config)


def _collect(job: BlockJob, modules: dict[str, nn.Module], want_hessian: bool, outputs: Optional[list] = None) -> dict:
    """Input statistics of `modules` over every calibration batch (block outputs appended to `outputs`)."""
    stats = {name: InputStats(want_hessian=want_hessian) for name in modules}
    with job.capture(modules, lambda name, inp, out: stats[name].add(inp.to(job.device))):
        for i in range(len(job.inputs)):
            out = job.forward_batch(i)
            if outputs is not None:
                outputs.append(out.to(job.inputs.hidden[i].device))
    return stats


def _residual_energy(inputs: BlockInputs) -> float:
    return float(sum(h.to(torch.float64).pow(2).sum() for h in inputs.hidden))


@torch.no_grad()
def _allocation_scores(model, plan: StructuredPlan, method: "StructuredMethod", config, inputs: BlockInputs,
                       progress: bool) -> list[torch.Tensor]:
    """Dense pass: the method's comparable scores of every module, in `plan.modules` order."""
    scores = []

    def visit(job: BlockJob) -> list:
        outputs: list = []
        modules = {kind: job.block.get_submodule(plan.names(kind)[1]) for kind in plan.kinds}
        stats = _collect(job, modules, method.stats == "hessian", outputs)
        energy = _residual_energy(job.inputs)
        for kind in plan.kinds:
            weight = read_weight(modules[kind], job.device)
            cost = plan.modules[len(scores)].cost
            scores.append(method.allocation_scores(kind, weight, stats[kind], plan.width(kind), cost, energy).cpu())
        return outputs  # the dense block's outputs, from the statistics pass

    walk_blocks(model, plan.blocks, plan.spec, config, inputs, visit, desc=f"Scoring ({config.method})",
                progress=progress)
    return scores


@torch.no_grad()
def run_structured(model: nn.Module, method: "StructuredMethod", config: "PruningConfig",
                   input_ids: Optional[torch.Tensor], progress: bool = True,
                   plan: Optional[StructuredPlan] = None) -> tuple[PruningReport, dict]:
    """Prunes heads and/or MLP channels of `model` in place and shrinks its linears.

    Returns:
        `(report, summary)`: the per-linear report (new shapes; `extra` holds the original shape) and the summary
        stored as `model.config.structured_pruning` (targets, achieved fractions, per-layer sizes, format).
    """
    plan = plan or StructuredPlan(model, config)
    plan.check_method(method, config)
    report = PruningReport(method=config.method)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if config.sparsity > 0:
            allocation = None
            if config.allocation == "search" and config.uniform_shapes:  # the heads/channels split
                from .uniform_search import uniform_shapes_search

                allocation = uniform_shapes_search(model, plan, method, config, input_ids, progress)
                kept = allocation.info["structured"]["kept_groups"]
                keeps = [kept[name] for name in plan.module_names()]
            elif config.allocation == "search":  # the dense model is restored when the search returns
                from .search import structured_search

                allocation = structured_search(model, plan, method, config, input_ids, progress)
                kept = allocation.info["structured"]["kept_groups"]
                keeps = [kept[name] for name in plan.module_names()]
            inputs = BlockInputs()  # data-free methods: no forward passes at all
            if method.needs_calibration:
                if input_ids is None:
                    raise ValueError(f"Method {config.method!r} needs calibration data.")
                inputs = capture_inputs(model, plan.blocks, input_ids, config.batch_size)
            if allocation is None:
                scores = None
                if method.allocation != "uniform":
                    scores = _allocation_scores(model, plan, method, config, inputs, progress)
                keeps = allocate(method.allocation, plan.modules, config.sparsity, scores,
                                 config.method_kwargs.get("temperature", 1.0),
                                 config.method_kwargs.get("max_deviation", 0.2))
                if config.uniform_shapes and method.allocation != "uniform":
                    per_module = keeps
                    keeps = pooled_common_sizes(plan.modules, keeps, config.sparsity)
                    allocation = allocation_record(method.allocation, plan, config.sparsity, keeps, info={
                        "uniform_shapes": True, "rule_kept_groups": dict(zip(plan.module_names(), per_module))})
                elif method.allocation != "uniform":
                    allocation = allocation_record(method.allocation, plan, config.sparsity, keeps)
            if allocation is not None:
                report.allocation = allocation.to_dict()
            keep_of = {m.key: k for m, k in zip(plan.modules, keeps)}
            _prune_blocks(model, plan, method, config, inputs, keep_of, report, progress)
    finally:
        model.train(was_training)
    fmt = finalize_config(model, plan.layout, plan.geometry, plan.blocks, plan.spec.blocks, plan.original_shapes,
                          uniform_shapes=config.uniform_shapes)
    summary = _summary(model, plan, config, fmt, "search" if config.allocation == "search" else method.allocation)
    report.layers = _layer_reports(model, plan)
    report.seconds = time.perf_counter() - started
    setattr(model.config, SUMMARY_KEY, summary)
    logger.info(
        "Structured %s (%s): removed %.2f%% of the prunable parameters (target %.2f%%), %.2f%% of the model "
        "(%d -> %d parameters), format %s.", config.method, config.structure,
        100 * summary["achieved_prunable_fraction"], 100 * config.sparsity, 100 * summary["achieved_model_fraction"],
        summary["model_params_before"], summary["model_params_after"], fmt,
    )
    return report, summary


def _prune_blocks(model: nn.Module, plan: StructuredPlan, method: "StructuredMethod", config, inputs: BlockInputs,
                  keep_of: dict, report: PruningReport, progress: bool) -> None:
    """Selects and shrinks each block's heads/channels (`walk_blocks`), on the outputs of the already pruned blocks."""
    def visit(job: BlockJob) -> None:
        job.diagnostics["index"] = job.index
        for kind in plan.kinds:
            output = plan.names(kind)[1]
            module = job.block.get_submodule(output)
            width = plan.width(kind)
            groups = in_features(module) // width
            keep = keep_of[(job.index, kind)]
            job.diagnostics[f"kept_{kind}"] = keep
            if keep >= groups:
                continue
            stats = _collect(job, {kind: module}, method.stats == "hessian")[kind]
            weight = read_weight(module, job.device)
            bias = module.bias.detach().to(job.device, torch.float32) if getattr(module, "bias", None) is not None else None
            decision = method.select(kind, weight, bias, stats, width, keep)
            if len(decision.keep) != keep:
                raise RuntimeError(f"{config.method} kept {len(decision.keep)} groups, asked {keep}.")
            job.diagnostics.update({f"{kind}_{k}": v for k, v in decision.diagnostics.items()})
            if kind == "heads":
                shrink_heads(job.block, plan.layout, plan.geometry, decision.keep.cpu(), decision.weight,
                             decision.bias_delta)
            else:
                shrink_channels(job.block, plan.layout, decision.keep.cpu(), decision.weight, decision.bias_delta)

    def after(job: BlockJob, _next_inputs) -> None:
        report.blocks.append({**job.diagnostics, "seconds": job.seconds})

    walk_blocks(model, plan.blocks, plan.spec, config, inputs, visit, after=after, desc=f"Pruning ({config.method})",
                progress=progress)


def _layer_reports(model: nn.Module, plan: StructuredPlan) -> list[LayerReport]:
    reports = []
    for name, (out_f, in_f, _) in plan.original_shapes.items():
        module = model.get_submodule(name)
        reports.append(shrunk_layer_report(name, (out_f, in_f), (out_features(module), in_features(module))))
    return reports


def _summary(model: nn.Module, plan: StructuredPlan, config, fmt: str, rule: str) -> dict:
    prunable_after = sum(_params(model.get_submodule(name)) for name in plan.original_shapes)
    prunable_before = plan.prunable
    model_after = count_parameters(model)
    layers = []
    for index, block in enumerate(plan.blocks):
        groups = plan.geometry.num_groups(block, plan.layout)
        layers.append({
            "block": index,
            "num_key_value_heads": groups,
            "num_attention_heads": groups * plan.geometry.q_per_kv,
            "intermediate_size": in_features(block.get_submodule(plan.layout.mlp_output)),
        })
    return {
        "method": config.method,
        "structure": config.structure,
        "target_sparsity": config.sparsity,
        "multiple_of": config.multiple_of,
        "prunable_params_before": prunable_before,
        "prunable_params_after": prunable_after,
        "achieved_prunable_fraction": 1.0 - prunable_after / prunable_before if prunable_before else 0.0,
        "model_params_before": plan.model_params,
        "model_params_after": model_after,
        "achieved_model_fraction": 1.0 - model_after / plan.model_params,
        "format": fmt,
        "uniform_shapes": config.uniform_shapes,
        "allocation": rule,
        "layers": layers,
    }
