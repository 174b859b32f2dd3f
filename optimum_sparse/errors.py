"""Public error classes: one per cause, each message naming the layer (or input) and what to do.

Every error below is raised before any weight changes, except `NonFiniteActivationError` raised by the activation
checks during a run (its message says which blocks were already pruned). All subclass `ValueError`
(`NonFiniteActivationError`: `FloatingPointError`) so existing `except ValueError` handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "OptimumSparseError", "UnsupportedModelError", "CheckpointMismatchError", "CalibrationError",
    "NonFiniteWeightError", "NonFiniteActivationError", "QuantizedWeightError", "MetaTensorError",
    "DeviceUnavailableError", "OutputPathError",
]


class OptimumSparseError(Exception):
    """Base class of the errors optimum-sparse raises on purpose."""


class UnsupportedModelError(OptimumSparseError, ValueError):
    """The model is not a causal decoder the engine can prune (encoder-decoder, encoder-only, no decoder blocks)."""


class CheckpointMismatchError(OptimumSparseError, ValueError):
    """The checkpoint folder belongs to a run with another config, model (weights included) or calibration set."""


class CalibrationError(OptimumSparseError, ValueError):
    """Raised for an empty, malformed or too-short calibration set."""


class NonFiniteWeightError(OptimumSparseError, ValueError):
    """A weight the run would prune (or a parameter its forward passes use) holds NaN or infinite values."""


class NonFiniteActivationError(OptimumSparseError, FloatingPointError):
    """The calibration activations reaching a layer are NaN or infinite (overflow, usually in float16)."""


class QuantizedWeightError(OptimumSparseError, ValueError):
    """A target layer holds quantized weights (int8, fp8, bitsandbytes, GPTQ/AWQ): prune the dense model instead."""


class MetaTensorError(OptimumSparseError, ValueError):
    """A target weight lives on the meta device with no offload storage (a model built empty and never loaded)."""


class DeviceUnavailableError(OptimumSparseError, ValueError):
    """The requested device (`PruningConfig.device`) does not exist on this machine."""


class OutputPathError(OptimumSparseError, ValueError):
    """The output folder cannot take the pruned model (a file, not writable, or another model without overwrite)."""
