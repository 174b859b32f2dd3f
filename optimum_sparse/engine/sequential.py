"""The block-sequential loop: capture block-0 inputs, then prune block by block, propagating pruned outputs."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..utils import matches_any, show_progress
from .architectures import ArchitectureSpec, find_blocks, get_architecture
from ..report import PruningReport
from .block import BlockJob
from .capture import BlockInputs, block_kinds, capture_block_inputs
from .devices import onload_block, solve_device
from .experts import ExpertLinear, expert_handles, is_router, table_name
from .linears import in_features, is_linear

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import RunCheckpoint
    from ..config import PruningConfig
    from ..methods.base import PruningMethod

__all__ = ["PruningReport", "find_target_linears", "check_targets", "capture_inputs", "walk_blocks", "on_each_block", "run_sequential"]

logger = logging.getLogger(__name__)


def find_target_linears(block: nn.Module, prefix: str, config: "PruningConfig", spec: ArchitectureSpec) -> dict[str, nn.Module]:
    """Target linears of a block, `{name relative to block: module}`, in the table's forward order."""
    found = {}
    for name, module in block.named_modules():
        if not name or not is_linear(module) or not is_target(block, prefix, name, module, config):
            continue
        found[name] = module
    for name, handle in expert_handles(block).items():  # fused experts: one matrix per expert and projection
        if is_target(block, prefix, name, handle, config):
            found[name] = handle
    order = {name: i for i, name in enumerate(spec.linear_names)}
    return dict(sorted(found.items(), key=lambda item: order.get(table_name(*item), len(order))))


def is_target(block: nn.Module, prefix: str, name: str, module, config: "PruningConfig") -> bool:
    """Whether the linear (or expert projection) `name` of a block is pruned under `config.targets`/`ignore`.

    Expert projections match the class pattern `"Linear"` (and `"ExpertLinear"`) and their names
    (`mlp.experts.7.down_proj`). Routers (`gate`, `router`, `shared_expert_gate` beside experts) are pruned only when
    `targets` names them by name or regex, never by class.
    """
    full = f"{prefix}.{name}"
    if matches_any(full, module, config.ignore):
        return False
    if is_router(block, name):
        return matches_any(full, object(), config.targets)  # names and regexes only
    if isinstance(module, ExpertLinear) and "Linear" in config.targets:
        return True
    return matches_any(full, module, config.targets)


def check_targets(model: nn.Module, config: "PruningConfig") -> tuple[ArchitectureSpec, nn.ModuleList, list[dict]]:
    """Validates the model against the config before any weight changes; returns the spec, blocks, targets."""
    spec = get_architecture(model)
    blocks = find_blocks(model, spec)
    targets = [find_target_linears(block, f"{spec.blocks}.{i}", config, spec) for i, block in enumerate(blocks)]
    if not any(targets):
        raise ValueError(
            f"No linear layer in the decoder blocks matches targets={config.targets} minus ignore={config.ignore}."
        )
    nm = config.nm
    if nm is not None:
        for i, linears in enumerate(targets):
            for name, module in linears.items():
                if in_features(module) % nm[1]:
                    raise ValueError(
                        f"{spec.blocks}.{i}.{name} has {in_features(module)} inputs, not a multiple of M={nm[1]} "
                        f"(structure={config.structure!r}); add it to `ignore`."
                    )
    return spec, blocks, targets


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """The calibration inputs of block 0, with the arguments of every block kind (`block_kinds`)."""
    first_of_kind: dict = {}
    for kind, block in zip(block_kinds(model, len(blocks)), blocks):
        first_of_kind.setdefault(kind, block)
    return capture_block_inputs(model, blocks[0], input_ids, batch_size, kinds=first_of_kind)


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    spec: ArchitectureSpec,
    config: "PruningConfig",
    inputs: Optional[BlockInputs],
    visit: Callable[[BlockJob], Optional[list]],
    targets: Optional[list[dict]] = None,
    sparsity_for: Optional[Callable[[str], float]] = None,
    start: int = 0,
    after: Optional[Callable[[BlockJob, Optional[BlockInputs]], None]] = None,
    desc: str = "Pruning",
    progress: bool = True,
) -> Optional[BlockInputs]:
    """The one block loop of every run (unstructured, N:M, structured, searches, MoE experts).

    For each block from `start`: onload it to its solve device (accelerate offload), build its `BlockJob` on the
    hidden states with the arguments of its kind, call `visit(job)` (which may change the block), then hand the
    block's outputs to the next block: the list `visit` returned, else `job.forward_all()` on the changed block.
    `after(job, inputs)` runs last, the block still onloaded and `inputs` already the next block's (checkpoints).

    Args:
        inputs: block 0's calibration inputs (`capture_inputs`); `None` for data-free runs (no forward at all).
        targets: per block `{name: module}` given to the job (default: none).
        sparsity_for: the job's per-layer target sparsity (default: `config.sparsity`).

    Returns:
        The inputs of the block after the last one (the model's final hidden states), or `None`.
    """
    kinds = block_kinds(model, len(blocks))
    sparsity_for = sparsity_for or (lambda name: config.sparsity)
    bar = tqdm(total=len(blocks), initial=start, desc=desc, unit="block", disable=not show_progress(progress))
    for index, block in enumerate(blocks):
        if index < start:
            continue
        device = solve_device(block, config.device)
        with onload_block(block, device):
            job = BlockJob(
                block, index, f"{spec.blocks}.{index}", spec, targets[index] if targets is not None else {},
                inputs.for_kind(kinds[index]) if inputs is not None else BlockInputs(), device, config, sparsity_for,
            )
            outputs = visit(job)
            if inputs is not None:
                inputs = inputs.with_hidden(outputs if outputs is not None else job.forward_all())
            if after is not None:
                after(job, inputs)
        bar.update(1)
        del job
    bar.close()
    return inputs


def on_each_block(blocks: nn.ModuleList, indices, config: "PruningConfig", fn: Callable[[int, nn.Module], None]) -> None:
    """Calls `fn(index, block)` with each block of `indices` onloaded to its solve device, no forward pass (a resumed
    run's checks and restores of its finished blocks)."""
    for index in indices:
        with onload_block(blocks[index], solve_device(blocks[index], config.device)):
            fn(index, blocks[index])


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    method: "PruningMethod",
    config: "PruningConfig",
    input_ids: Optional[torch.Tensor],
    sparsity_for: Optional[Callable[[str], float]] = None,
    progress: bool = True,
    checkpoint: Optional["RunCheckpoint"] = None,
) -> PruningReport:
    """Prunes `model` in place, one decoder block at a time (`walk_blocks` with `method.prune_block`).

    Args:
        model: a causal LM (`PreTrainedModel`).
        method: the pruning method instance.
        config: the pruning config.
        input_ids: calibration tokens `[n, seq_len]` (`None` for methods without calibration).
        sparsity_for: per-layer target sparsity by full module name (default: `config.sparsity`).
        progress: show a progress bar over blocks.
        checkpoint: a `RunCheckpoint`: the state is saved after every block, and a resumed run starts at the first
            unfinished block (its predecessors' pruned weights and the propagated hidden states come from the folder).
    """
    spec, blocks, targets = check_targets(model, config)
    report = PruningReport(method=config.method)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        inputs: Optional[BlockInputs] = None
        if method.needs_calibration:
            if input_ids is None:
                raise ValueError(f"Method {config.method!r} needs calibration data.")
            inputs = capture_inputs(model, blocks, input_ids, config.batch_size)
        start = checkpoint.next_block if checkpoint is not None else 0
        if start:
            logger.info("Resuming from %s: blocks 0-%d already pruned.", checkpoint.folder, start - 1)
            finished = range(min(start, len(blocks)))
            # every finished block's dense weights are checked before any is replaced
            on_each_block(blocks, finished, config, lambda index, block: checkpoint.check_dense(index, targets[index]))
            on_each_block(blocks, finished, config, lambda index, block: checkpoint.restore_block(index, targets[index]))
            checkpoint.restore_report(report)
            if inputs is not None:
                inputs = inputs.with_hidden(checkpoint.restore_hidden())
        def visit(job: BlockJob) -> None:
            if checkpoint is not None:
                checkpoint.note_dense(job.index, job.linears)
            if job.linears:
                method.prune_block(job)

        def after(job: BlockJob, next_inputs: Optional[BlockInputs]) -> None:
            report.layers.extend(job.reports)
            report.blocks.append({"index": job.index, "seconds": job.seconds, **job.diagnostics})
            if checkpoint is not None:
                checkpoint.save(job.index, job.linears, next_inputs.hidden if next_inputs is not None else None, report)

        walk_blocks(model, blocks, spec, config, inputs, visit, targets=targets, sparsity_for=sparsity_for,
                    start=start, after=after, desc=f"Pruning ({config.method})", progress=progress)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - started
    logger.debug("Block loop: %d layers in %.1fs.", len(report.layers), report.seconds)  # apply() logs the run's total
    return report
