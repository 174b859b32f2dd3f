"""`SparsePruner`: the entry point that prunes a transformers causal LM in place."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from .config import PruningConfig
from .data.calibration import get_calibration_ids
from .engine.sequential import PruningReport, check_targets, run_sequential
from .methods import get_method_class
from .utils import atomic_write_text

__all__ = ["SparsePruner", "SPARSITY_CONFIG_NAME", "REPORT_NAME"]

logger = logging.getLogger(__name__)

SPARSITY_CONFIG_NAME = "sparsity_config.json"
REPORT_NAME = "pruning_report.json"


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

    def prepare_calibration(self, model: nn.Module, tokenizer: Any = None, dataset: Any = None) -> Optional[torch.Tensor]:
        """Returns the calibration token ids `[n, seq_len]` the run will use (`None` if the method needs none)."""
        if not self.method.needs_calibration:
            return None
        source = dataset if dataset is not None else self.config.dataset
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        c = self.config
        return get_calibration_ids(source, tokenizer, c.num_samples, c.seq_len, c.seed, vocab_size=vocab)

    def apply(self, model: nn.Module, tokenizer: Any = None, dataset: Any = None,
              sparsity_for: Optional[Callable[[str], float]] = None, progress: bool = True) -> nn.Module:
        """Prunes `model` in place and returns it.

        Every check (model layout, targets, N:M shapes, calibration data, tokenizer) runs before any weight
        changes. The run's per-layer report is kept in `self.report`.

        Args:
            model: an `AutoModelForCausalLM` (any device placement, accelerate device maps included).
            tokenizer: tokenizer for text calibration sources.
            dataset: calibration source, overriding `config.dataset` (see `optimum_sparse.data.calibration`).
            sparsity_for: optional per-layer sparsity, by full module name (layer-wise allocation).
            progress: show progress bars.
        """
        if not isinstance(model, nn.Module) or not hasattr(model, "get_input_embeddings"):
            raise TypeError(
                f"SparsePruner.apply expects a transformers PreTrainedModel (AutoModelForCausalLM), got {type(model).__name__}."
            )
        check_targets(model, self.config)
        input_ids = self.prepare_calibration(model, tokenizer, dataset)
        self.report = run_sequential(model, self.method, self.config, input_ids, sparsity_for, progress)
        model.pruning_config = self.config
        return model

    def sparsity_metadata(self) -> dict:
        """Sparsity metadata with compressed-tensors key names, stored beside (never in) `config.json`."""
        if self.report is None:
            raise RuntimeError("Call apply() before asking for the sparsity metadata.")
        c = self.config
        return {
            "format": "dense",
            "sparsity_structure": c.structure,
            "global_sparsity": self.report.mean_sparsity,
            "targets": list(c.targets),
            "ignore": list(c.ignore) + ["lm_head"],
            "method": c.method,
            "layers": {r.name: r.sparsity for r in self.report.layers},
        }

    def save_pretrained(self, model: nn.Module, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """Saves the pruned model (`model.save_pretrained`), `pruning_config.json`, `sparsity_config.json` and the
        run report. Extra keyword arguments go to `model.save_pretrained`."""
        model.save_pretrained(save_directory, **kwargs)
        self.config.save_pretrained(save_directory)
        atomic_write_text(os.path.join(save_directory, SPARSITY_CONFIG_NAME),
                          json.dumps(self.sparsity_metadata(), indent=2, sort_keys=True) + "\n")
        atomic_write_text(os.path.join(save_directory, REPORT_NAME), json.dumps(self.report.to_dict(), indent=2) + "\n")
