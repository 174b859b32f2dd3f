"""`SparsePruner`: the entry point that prunes a transformers causal LM in place."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from .config import PruningConfig
from .data.calibration import get_calibration_ids
from .engine.checkpoint import RunCheckpoint, run_fingerprint
from .engine.distributed import shard_rows, world
from .engine.inventory import build_inventory
from .engine.sequential import check_targets
from .report import PruningReport
from .engine.validation import linear_targets, validate_run
from .methods import get_method_class
from .serialization import RECORD_NAME
from .serialization import (SPARSITY_CONFIG_NAME, PruningReport, attach_pruning_record, attached_tokenizer,
                            build_sparsity_config)

__all__ = ["SparsePruner", "SPARSITY_CONFIG_NAME", "RECORD_NAME", "REPORT_NAME"]

REPORT_NAME = RECORD_NAME  # the old name of the record's file name (`pruning_report.json`), kept for callers

logger = logging.getLogger(__name__)


def _check_nm_sparsity_for(model: nn.Module, config: PruningConfig, sparsity_for: Callable[[str], float]) -> None:
    """N:M runs: every layer's sparsity must be a multiple of 1/M (its pattern N_i:M); raises `ValueError` naming the
    first layer that is not."""
    from .allocation import target_modules
    from .methods.masks import layer_nm

    for module in target_modules(model, config):
        try:
            layer_nm(config.nm, sparsity_for(module.name))
        except ValueError as err:
            raise ValueError(f"sparsity_for({module.name!r}) with structure={config.structure!r}: {err}") from None


def _validate(model: nn.Module, config: PruningConfig) -> None:
    """Structured runs (expert removal included): the pre-run checks over every linear of the decoder blocks."""
    from .engine.architectures import find_blocks, get_architecture
    from .engine.linears import is_linear

    spec = get_architecture(model)
    blocks = find_blocks(model, spec)
    linears = [{name: m for name, m in block.named_modules() if name and is_linear(m)} for block in blocks]
    validate_run(model, config, blocks, spec.blocks, linear_targets(model, spec.blocks, linears))


class SparsePruner:
    """Prunes a causal language model after training, one decoder block at a time.

    Args:
        config (`PruningConfig`, *optional*): the run's configuration; keyword arguments build one if omitted.

    Example:

    ```python
    >>> from optimum_sparse import PruningConfig, SparsePruner
    >>> pruner = SparsePruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=64, seq_len=512))
    >>> model = pruner.apply(model, tokenizer=tokenizer)  # in place; returns the model
    >>> pruner.report.mean_sparsity
    0.5
    ```
    """

    def __init__(self, config: Optional[PruningConfig] = None, **kwargs):
        if config is None:
            config = PruningConfig(**kwargs)
        elif kwargs:
            raise ValueError("Pass either a PruningConfig or keyword arguments, not both.")
        if not isinstance(config, PruningConfig):
            raise TypeError(f"config must be a PruningConfig, got {type(config).__name__}.")
        self.config = config
        self.method = get_method_class(config.method)(config)
        self.report: Optional[PruningReport] = None
        self.allocation = None  # the layer-wise `Allocation` of the last run (None for plain uniform pruning)
        self.record: Optional[PruningReport] = None
        self.tokenizer: Any = None  # the tokenizer passed to `apply`, the default of save_pretrained / push_to_hub
        self.structured_summary: Optional[dict] = None  # structured runs: achieved sizes and fractions

    def prepare_calibration(self, model: nn.Module, tokenizer: Any = None, dataset: Any = None) -> Optional[torch.Tensor]:
        """Returns the calibration token ids `[n, seq_len]` the run will use (`None` if the method needs none)."""
        from .allocation import allocation_needs_calibration

        if not self.method.needs_calibration and not allocation_needs_calibration(self.config):
            return None
        source = dataset if dataset is not None else self.config.dataset
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        c = self.config
        return get_calibration_ids(source, tokenizer, c.num_samples, c.seq_len, c.seed, vocab_size=vocab)

    def apply(self, model: nn.Module, tokenizer: Any = None, dataset: Any = None,
              sparsity_for: Optional[Callable[[str], float]] = None, progress: bool = True,
              checkpoint_dir: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
              attach: bool = True) -> nn.Module:
        """Prunes `model` in place and returns it.

        Every check (model kind and layout, targets, N:M shapes, device, quantized/meta/non-finite weights,
        calibration data, tokenizer) runs before any weight changes (`optimum_sparse.errors`). The run's per-layer
        report is kept in `self.report`; `report.seconds` is the wall time of this call (checks, calibration,
        allocation and pruning), the figure logged and written to the record and the card.

        Args:
            model: an `AutoModelForCausalLM` (any device placement, accelerate device maps included).
            tokenizer: tokenizer for text calibration sources.
            dataset: calibration source, overriding `config.dataset` (see `optimum_sparse.data.calibration`).
            sparsity_for: optional per-layer sparsity, by full module name; replaces `config.allocation`. Unstructured
                and N:M only (structured methods allocate through `method_kwargs["allocation"]`); N:M runs take
                multiples of `1/M` (the layer's pattern `N_i:M`, checked before any weight changes).
            progress: show progress bars.
            checkpoint_dir: save the run's state after every block there (pruned block weights, propagated
                calibration activations, report; atomic writes), so a killed run can be resumed.
            resume: continue the run checkpointed in `checkpoint_dir` at its first unfinished block; the result is
                identical to an uninterrupted run. A checkpoint of another config, model or calibration set is refused
                (`CheckpointMismatchError`) before any weight changes.
            attach: keep the record on the model (`model.pruning_record`) and make `model.save_pretrained(folder)`
                write it, with the tokenizer, sidecar and card (`serialization.PrunedSavePretrained`, installed on the
                instance). `False` leaves the model's `save_pretrained` alone; save with `self.save_pretrained`.

        Under `torchrun` / `accelerate launch` (an initialised `torch.distributed` group), every rank calls `apply` with
        the same model and data: each keeps every N-th calibration window and the statistics are all-reduced, so all
        ranks end with the same pruned model (see `optimum_sparse.engine.distributed`).
        """
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir of the run to resume.")
        if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
            raise TypeError(
                f"SparsePruner.apply expects a transformers PreTrainedModel (AutoModelForCausalLM), got {type(model).__name__}."
            )
        self.allocation = None
        started = time.perf_counter()  # one clock for the log line, the report, the record and the card
        if self.config.structure in ("experts", "expert-channels"):
            input_ids = self._prune_experts(model, tokenizer, dataset, sparsity_for, checkpoint_dir, resume, progress)
        elif self.config.is_structured:
            from .structured.runner import plan_structured, run_structured

            if sparsity_for is not None:
                raise ValueError("sparsity_for applies to unstructured/N:M runs; structured methods allocate through "
                                 "PruningConfig.method_kwargs['allocation'] or PruningConfig.allocation='search'.")
            if checkpoint_dir is not None:
                raise ValueError("checkpoint_dir/resume are not supported by structured methods yet.")
            _validate(model, self.config)
            plan = plan_structured(model, self.config)  # every check before any change
            input_ids = self.prepare_calibration(model, tokenizer, dataset)
            self.report, self.structured_summary = run_structured(model, self.method, self.config, input_ids,
                                                                  progress, plan=plan)
            if self.report.allocation is not None:  # a searched or method (threshold/softmax) allocation
                from .allocation import Allocation

                self.allocation = Allocation.from_dict(self.report.allocation)
        else:
            spec, blocks, targets = check_targets(model, self.config)
            inventory = build_inventory(model, self.config, spec, blocks, targets)  # raises on an uncovered matrix
            validate_run(model, self.config, blocks, spec.blocks, linear_targets(model, spec.blocks, targets))
            input_ids = self.prepare_calibration(model, tokenizer, dataset)
            rank, world_size = world()
            local_ids = shard_rows(input_ids)  # several processes: this rank's share of the windows
            checkpoint = None
            if checkpoint_dir is not None:
                folder = os.path.join(checkpoint_dir, f"rank{rank}") if world_size > 1 else checkpoint_dir
                checkpoint = RunCheckpoint(folder, run_fingerprint(model, self.config, local_ids), resume=resume)
            if sparsity_for is not None and self.config.nm is not None:
                _check_nm_sparsity_for(model, self.config, sparsity_for)  # before any weight changes
            if sparsity_for is None:
                from .allocation import allocate

                self.allocation = allocate(model, self.config, self.method, input_ids, progress)
                sparsity_for = self.allocation.sparsity_for if self.allocation is not None else None
            whole_model = self.method.whole_model  # a capability flag of the method (ELSA: its own data split)
            self.report = self.method.prune_model(model, input_ids if whole_model else local_ids, sparsity_for,
                                                  progress and rank == 0, tokenizer=tokenizer, checkpoint=checkpoint)
            if self.allocation is not None:
                self.report.allocation = self.allocation.to_dict()
            measured = inventory.measure()["per_target"]
            for layer in self.report.layers:
                if layer.name in measured:
                    layer.extra["measured_sparsity"] = measured[layer.name]
            self.report.inventory = inventory.summary()
        self.report.seconds = time.perf_counter() - started
        logger.info("Pruned %d layers in %.1f s (mean sparsity %.4f).", len(self.report.layers), self.report.seconds,
                    self.report.mean_sparsity)
        if self.report.inventory is not None:
            logger.info("Measured sparsity %.4f over %d target parameters (%.1f%% of the model); %d block parameters "
                        "skipped: %s.", self.report.mean_sparsity, self.report.inventory["target_params"],
                        100 * self.report.inventory["pruned_share"], len(self.report.inventory["skipped"]),
                        self.report.inventory["skipped_reasons"])
        model.pruning_config = self.config
        self.record = PruningReport.from_run(self.config, self.report, dataset, input_ids, model)
        self.report = self.record  # one object: what the engine did plus the run (config, calibration, base model)
        self.tokenizer = tokenizer
        if attach:  # model.save_pretrained now writes the record too (serialization.PrunedSavePretrained)
            attach_pruning_record(model, self.record, tokenizer)
        return model

    def _prune_experts(self, model, tokenizer, dataset, sparsity_for, checkpoint_dir, resume, progress) -> torch.Tensor:
        """Whole-expert removal (`structure="experts"`, `optimum_sparse.structured.experts`) or expert-channel pruning
        (`structure="expert-channels"`, `optimum_sparse.structured.expert_channels`), block by block
        (`optimum_sparse.structured.moe_runner`: offload, checkpoints, several processes); returns the calibration."""
        from .structured.moe_runner import MoECheckpoint

        if self.config.structure == "experts":
            from .structured.experts import plan_expert_removal as plan_fn, run_expert_removal as run_fn
        else:
            from .structured.expert_channels import plan_expert_channels as plan_fn, run_expert_channels as run_fn
        if sparsity_for is not None:
            raise ValueError(f"structure={self.config.structure!r} prunes every MoE block alike (one expert count or "
                             "width in the config): sparsity_for does not apply.")
        _validate(model, self.config)
        plan = plan_fn(model, self.config)  # every check before any change
        input_ids = self.prepare_calibration(model, tokenizer, dataset)
        rank, world_size = world()
        local_ids = shard_rows(input_ids)  # several processes: this rank's share of the windows, statistics summed
        checkpoint = None
        if checkpoint_dir is not None:
            folder = os.path.join(checkpoint_dir, f"rank{rank}") if world_size > 1 else checkpoint_dir
            checkpoint = MoECheckpoint(folder, run_fingerprint(model, self.config, local_ids), resume=resume)
        self.report, self.structured_summary = run_fn(model, self.method, self.config, local_ids,
                                                      progress and rank == 0, plan=plan, checkpoint=checkpoint)
        return input_ids

    def _tokenizer_for(self, model: nn.Module) -> Any:
        """The tokenizer passed to `apply` (by this pruner, or the one kept by the model's `save_pretrained`)."""
        return self.tokenizer if self.tokenizer is not None else attached_tokenizer(model)

    def _record_for(self, model: Optional[nn.Module] = None) -> PruningReport:
        record = self.record or getattr(model, "pruning_record", None)
        if record is None:
            raise RuntimeError("Call apply() before saving, pushing or recording perplexity.")
        return record

    def sparsity_metadata(self, model: Optional[nn.Module] = None) -> dict:
        """Sparsity metadata with compressed-tensors key names, stored beside (never in) `config.json`."""
        return build_sparsity_config(self._record_for(model), model)

    def record_perplexity(self, before: Optional[float] = None, after: Optional[float] = None,
                          dataset: str = "wiki-offline", seq_len: int = 512, windows: Optional[int] = None) -> None:
        """Records dense (`before`) and pruned (`after`) perplexity for the saved record and the model card.

        Args:
            before: perplexity of the dense model, measured before `apply`.
            after: perplexity of the pruned model.
            dataset: the evaluation data (`"wiki-offline"`, `"wikitext2"`, ... or a description).
            seq_len: window length of the evaluation.
            windows: number of windows evaluated (`None`: all).
        """
        self._record_for().set_perplexity(before, after, dataset, seq_len, windows)

    def record_accuracy(self, before: Any = None, after: Any = None, num_fewshot: Optional[int] = None,
                        limit: Optional[float] = None) -> None:
        """Records dense (`before`) and pruned (`after`) lm-eval accuracy for the saved record and the model card.

        Args:
            before: accuracy of the dense model, measured before `apply`: `optimum_sparse.eval.run_tasks` results
                (they carry task versions, item counts and the lm-eval version) or an `evaluate_tasks` dict.
            after: accuracy of the pruned model, in the same form.
            num_fewshot: few-shot examples (only needed with `evaluate_tasks` dicts).
            limit: items per task (only needed with `evaluate_tasks` dicts).
        """
        from .eval.accuracy import accuracy_table

        self._record_for().set_accuracy(accuracy_table(before, after, num_fewshot, limit))

    def save_pretrained(self, model: nn.Module, save_directory: Union[str, os.PathLike], tokenizer: Any = None,
                        model_card: bool = True, overwrite: bool = False, **kwargs) -> str:
        """Saves the pruned model atomically: safetensors and `config.json` (`model.save_pretrained`), the tokenizer,
        `pruning_config.json`, `sparsity_config.json`, `pruning_report.json` and the model card (`README.md` and
        `sparsity_plot.png`). Extra keyword arguments go to `model.save_pretrained`. Returns the folder.

        A folder that already holds a model is refused (`OutputPathError`) unless `overwrite=True`; so are a file, the
        current directory and an unwritable parent.

        The tokenizer defaults to the one passed to `apply`. See `optimum_sparse.serialization.save_pruned_model`.
        """
        from .serialization import save_pruned_model

        tokenizer = tokenizer if tokenizer is not None else self._tokenizer_for(model)
        return save_pruned_model(model, save_directory, self._record_for(model), tokenizer=tokenizer,
                                 model_card=model_card, overwrite=overwrite, **kwargs)

    def push_to_hub(self, model: nn.Module, repo_id: str, *, private: Optional[bool] = None,
                    revision: Optional[str] = None, token: Optional[str] = None, commit_message: Optional[str] = None,
                    save_directory: Optional[Union[str, os.PathLike]] = None, tokenizer: Any = None, **kwargs):
        """Saves the pruned model (with its card) and uploads it to the Hub in one commit.

        Args:
            model: the pruned model.
            repo_id: `"namespace/name"`; created if it does not exist.
            private: create the repository private.
            revision: branch to push to (created if needed).
            token: Hub token (default: `HF_TOKEN`, then the saved login); never logged.
            commit_message: commit title.
            save_directory: where to save first (default: a temporary folder, kept if the upload fails).
            tokenizer: tokenizer to include (default: the one passed to `apply`).
            kwargs: `commit_description`, `create_pr`, `endpoint` (default `HF_ENDPOINT`), `api` (an `HfApi`),
                `card_kwargs`, and `model.save_pretrained` arguments.

        Returns:
            `huggingface_hub.CommitInfo`. Raises `optimum_sparse.hub.HubPushError` when the upload fails.
        """
        from .hub.push import push_pruned_model

        tokenizer = tokenizer if tokenizer is not None else self._tokenizer_for(model)
        return push_pruned_model(model, repo_id, self._record_for(model), tokenizer=tokenizer,
                                 save_directory=save_directory, private=private, revision=revision, token=token,
                                 commit_message=commit_message, **kwargs)
