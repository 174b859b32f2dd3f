"""optimum-sparse: post-training pruning of causal language models, the Hugging Face way."""

import logging as _logging

from . import allocation as _allocation  # registers the allocation check of PruningConfig
from . import hub as _hub  # registers the model-card writer of the save path
from .structured import search as _structured_search  # registers the structured search check
from .config import PruningConfig
from .report import PruningRecord, PruningReport
from .errors import (
    CalibrationError, CheckpointMismatchError, DeviceUnavailableError, MetaTensorError, NonFiniteActivationError,
    NonFiniteWeightError, OptimumSparseError, OutputPathError, QuantizedWeightError, UnsupportedModelError,
)
from .eval import evaluate_perplexity, evaluate_tasks
from .methods import (ALPSOptions, ELSAOptions, SparseLLMOptions, StructPruneOptions, StructuredOptions,
                      available_methods, register_method)
from .options import Options
from .models import load_model_and_tokenizer
from .pruner import SparsePruner
from .version import __version__

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

_LAZY = {"merge_and_unload_sparse": "integrations.peft", "mask_lora_updates": "integrations.peft"}  # imports peft


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "PruningConfig", "SparsePruner", "PruningReport", "PruningRecord", "UnsupportedModelError", "CalibrationError", "CheckpointMismatchError",
    "OptimumSparseError", "NonFiniteWeightError", "NonFiniteActivationError", "QuantizedWeightError", "MetaTensorError",
    "DeviceUnavailableError", "OutputPathError",
    "evaluate_perplexity", "evaluate_tasks", "available_methods", "register_method", "load_model_and_tokenizer", "__version__",
    "merge_and_unload_sparse", "mask_lora_updates",
    "Options", "ALPSOptions", "ELSAOptions", "SparseLLMOptions", "StructuredOptions", "StructPruneOptions",
]
