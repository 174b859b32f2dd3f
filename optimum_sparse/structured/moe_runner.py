"""The one runner of the structured mixture-of-experts runs (whole-expert removal, expert channels), on the engine's
block loop (`optimum_sparse.engine.sequential.walk_blocks`).

Block by block: the block is onloaded (accelerate offload included), its calibration inputs run through it once with
hooks that read the router's decisions and collect the family's per-expert statistics (`MoEStructure.collect`),
the statistics are summed over the processes of a `torch.distributed` group (each rank holds every N-th calibration
window), the family decides what to keep (identical on every rank), the block's tensors are sliced (and written back
to accelerate's offload storage with their new shapes), and the pruned block's outputs go to the next block. Dense
blocks are walked through unchanged. With a checkpoint folder (`MoECheckpoint`) the kept indices of every finished
block and the propagated hidden states are saved, and a resumed run re-applies the finished blocks' slices to the
dense model and continues; the result is bit-identical to an uninterrupted run.

A family (`MoEStructure`) knows its statistics, decision and slicing; the runner knows blocks, processes, offload and
checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..engine.architectures import find_blocks, get_architecture
from ..engine.checkpoint import CheckpointMismatchError, RunCheckpoint
from ..engine.offload import _offloaded_tensor_names, offload_hook, update_offloaded_tensor
from ..engine.sequential import PruningReport, capture_inputs, on_each_block, walk_blocks
from .shrink import count_parameters, shrunk_layer_report

if TYPE_CHECKING:  # pragma: no cover
    from ..config import PruningConfig
    from ..engine.block import BlockJob
    from .experts import MoELayer

__all__ = ["MoEStructure", "MoECheckpoint", "run_moe_structured"]

logger = logging.getLogger(__name__)


class MoEStructure:
    """One family of structured MoE pruning, as `run_moe_structured` drives it block by block.

    Args:
        model: the model (its plan already checked).
        method: the method instance (its criterion).
        config: the pruning config.
        plan: the family's plan (`plan.layers`: the `MoELayer` of every MoE block).
    """

    structure: str = ""
    diagnostics_key: str = ""
    desc: str = "Pruning experts"

    def __init__(self, model: nn.Module, method, config: "PruningConfig", plan):
        self.model, self.method, self.config, self.plan = model, method, config, plan
        self.params_before = count_parameters(model)
        self.prunable_before = self.prunable()

    @classmethod
    def run(cls, model: nn.Module, method, config: "PruningConfig", input_ids: Optional[torch.Tensor], plan,
            progress: bool = True, checkpoint: Optional["MoECheckpoint"] = None) -> tuple[PruningReport, dict]:
        """`run_moe_structured` with this family; returns `(report, summary)`."""
        return run_moe_structured(model, cls(model, method, config, plan), input_ids, progress, checkpoint)

    def collect(self, layer: "MoELayer") -> tuple[Any, list]:
        """`(statistics, hook handles)`: hooks on the block's modules that fill the statistics during its forward."""
        raise NotImplementedError

    def all_reduce(self, stats: Any) -> None:
        """Sums the statistics over the processes (in place)."""
        raise NotImplementedError

    def decide(self, layer: "MoELayer", stats: Any) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """`(decision, report block entries)`: the kept indices as named tensors (what a checkpoint stores)."""
        raise NotImplementedError

    def apply(self, layer: "MoELayer", decision: dict[str, torch.Tensor]) -> list[tuple[str, tuple, tuple]]:
        """Slices the block's tensors by `decision`; returns `(name, shape before, shape after)` per sliced weight."""
        raise NotImplementedError

    def tensors(self, layer: "MoELayer") -> list[torch.Tensor]:
        """The block's tensors the decision acts on (their dense values are checked when a run is resumed)."""
        raise NotImplementedError

    def prunable(self) -> int:
        """Entries of the tensors the family acts on, over every MoE block (measured on the model)."""
        raise NotImplementedError

    def config_update(self) -> tuple[str, int]:
        """`(config field, new value)`: the expert count or width the pruned model has."""
        raise NotImplementedError

    def details(self, report: PruningReport) -> dict:
        """The family's fields of the summary (from the finished report)."""
        raise NotImplementedError

    def summary(self, report: PruningReport) -> dict:
        """The run's summary (also `model.config.structured_pruning`); updates the model's config field."""
        from .runner import SUMMARY_KEY

        field, value = self.config_update()
        setattr(self.model.config, field, value)
        params_after = count_parameters(self.model)
        summary = {
            "structure": self.structure, "method": self.config.method, "criterion": self.method.criterion,
            **self.details(report), "config_field": field, "moe_blocks": [layer.index for layer in self.plan.layers],
            "dense_blocks": self.plan.skipped_blocks, "model_params_before": self.params_before,
            "model_params_after": params_after, "achieved_model_fraction": 1.0 - params_after / self.params_before,
            # the tensors the family acts on (experts modules, routers, coupled shared experts)
            "achieved_prunable_fraction": 1.0 - self.prunable() / self.prunable_before, "format": "stock",
            "statistics": "sequential",  # each block scored on the outputs of the pruned blocks before it
        }
        setattr(self.model.config, SUMMARY_KEY, summary)
        logger.info("%s structure=%r (%s) in %d MoE blocks: %s = %d; %d -> %d parameters (%.2f%% of the model).",
                    type(self).__name__, self.structure, self.method.criterion, len(self.plan.layers), field, value,
                    self.params_before, params_after, 100 * summary["achieved_model_fraction"])
        return summary


class MoECheckpoint(RunCheckpoint):
    """`RunCheckpoint` for runs that change shapes: per finished block the decision's tensors (kept indices) instead of
    pruned weights, the hidden states the next block receives, the report so far, and a digest of the block's dense
    tensors."""

    def note_tensors(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Records the digest of block `index`'s dense tensors (onloaded, before the slice)."""
        self.note_dense(index, _as_linears(tensors))

    def check_tensors(self, index: int, tensors: list[torch.Tensor]) -> None:
        """Raises `CheckpointMismatchError` when block `index`'s dense tensors are not those the checkpoint started from."""
        self.check_dense(index, _as_linears(tensors))

    def save_decision(self, index: int, decision: dict[str, torch.Tensor], hidden: Optional[list],
                      report: PruningReport) -> None:
        """Records block `index` as done: its decision's tensors (kept indices), the next block's hidden states, the
        report (`RunCheckpoint.save_tensors`)."""
        self.save_tensors(index, decision, hidden, report)

    def load_decision(self, index: int) -> dict[str, torch.Tensor]:
        path = self._block_path(index)
        if not os.path.exists(path):
            raise CheckpointMismatchError(f"The checkpoint in {self.folder} misses {os.path.basename(path)} of a "
                                          f"finished block {index}; use another folder. Nothing was changed.")
        return load_file(path)


def _as_linears(tensors: list[torch.Tensor]) -> dict:
    """`{name: object with .weight}` in the tensors' order, as `RunCheckpoint.note_dense` / `check_dense` take them."""
    return {f"{i:06d}": SimpleNamespace(weight=t) for i, t in enumerate(tensors)}


def _write_back(moe: nn.Module, before: dict) -> None:
    """Writes every tensor of `moe` replaced since `before` (`{(module id, name): tensor}`) into accelerate's offload
    storage (a no-op for modules that are not offloaded): the sliced tensors have new shapes."""
    for module in moe.modules():
        hook = offload_hook(module)
        if hook is None:
            continue
        for name in _offloaded_tensor_names(module, hook):
            if "." in name:  # a hook that places submodules: their own entries are reached through `name`
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
            else:
                owner, leaf = module, name
            tensor = owner._parameters.get(leaf, owner._buffers.get(leaf))
            if tensor is not None and before.get((id(owner), leaf)) is not tensor:
                update_offloaded_tensor(module, name, tensor)


def _tensors_by_owner(moe: nn.Module) -> dict:
    return {(id(m), n): t for m in moe.modules() for n, t in [*m._parameters.items(), *m._buffers.items()]}


def _slice(structure: MoEStructure, layer: "MoELayer", decision: dict, report: Optional[PruningReport]) -> None:
    before = _tensors_by_owner(layer.moe)
    shapes = structure.apply(layer, decision)
    _write_back(layer.moe, before)
    if report is not None:
        report.layers.extend(shrunk_layer_report(name, old, new) for name, old, new in shapes)


@torch.no_grad()
def run_moe_structured(model: nn.Module, structure: MoEStructure, input_ids: torch.Tensor, progress: bool = True,
                       checkpoint: Optional[MoECheckpoint] = None) -> tuple[PruningReport, dict]:
    """Prunes the MoE blocks of `model` in place, block by block (see the module docstring).

    Args:
        model: the model; `structure.plan` was made on it (every check before any change).
        structure: the family (`ExpertRemovalStructure`, `ExpertChannelStructure`).
        input_ids: this process's calibration windows `[n, seq_len]`.
        progress: show a progress bar over blocks.
        checkpoint: save the state after every block; a resumed one re-applies its finished blocks first.

    Returns:
        `(report, summary)`; the summary is also `report.diagnostics[structure.diagnostics_key]`.
    """
    config = structure.config
    if input_ids is None:
        raise ValueError(f"Method {config.method!r} needs calibration data.")
    started = time.perf_counter()
    spec = get_architecture(model)
    blocks = find_blocks(model, spec)
    by_index = {layer.index: layer for layer in structure.plan.layers}
    report = PruningReport(method=config.method)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_inputs(model, blocks, input_ids, config.batch_size)
        start = checkpoint.next_block if checkpoint is not None else 0
        if start:
            logger.info("Resuming from %s: blocks 0-%d already pruned.", checkpoint.folder, start - 1)
            finished = [by_index[i] for i in range(min(start, len(blocks))) if i in by_index]
            indices = [layer.index for layer in finished]
            # every check before any block is changed
            on_each_block(blocks, indices, config,
                          lambda index, block: checkpoint.check_tensors(index, structure.tensors(by_index[index])))
            decisions = {index: checkpoint.load_decision(index) for index in indices}
            on_each_block(blocks, indices, config,
                          lambda index, block: _slice(structure, by_index[index], decisions[index], None))
            checkpoint.restore_report(report)
            inputs = inputs.with_hidden(checkpoint.restore_hidden())
        pending: dict[int, dict] = {}

        def visit(job: "BlockJob") -> None:
            layer = by_index.get(job.index)
            if layer is None:
                return None
            if checkpoint is not None:
                checkpoint.note_tensors(job.index, structure.tensors(layer))
            stats, handles = structure.collect(layer)
            try:
                job.forward_all()  # the hooks read the routing and fill `stats`
            finally:
                for handle in handles:
                    handle.remove()
            structure.all_reduce(stats)
            decision, entries = structure.decide(layer, stats)
            _slice(structure, layer, decision, report)
            report.blocks.extend(entries)
            pending[job.index] = decision
            return None  # walk_blocks propagates the pruned block's outputs

        def after(job: "BlockJob", next_inputs) -> None:
            decision = pending.pop(job.index, {})
            if checkpoint is not None:
                checkpoint.save_decision(job.index, decision, next_inputs.hidden, report)

        walk_blocks(model, blocks, spec, config, inputs, visit, start=start, after=after, desc=structure.desc,
                    progress=progress)
    finally:
        model.train(was_training)
    summary = structure.summary(report)
    report.diagnostics[structure.diagnostics_key] = summary
    report.seconds = time.perf_counter() - started
    return report, summary
