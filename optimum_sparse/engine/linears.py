"""Uniform access to the weight of a linear layer (`nn.Linear`, GPT-2's transposed `Conv1D`, or one expert's
projection inside fused MoE weights: `engine.experts.ExpertLinear`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .experts import ExpertLinear
from .offload import update_offloaded_tensor

__all__ = ["is_linear", "read_weight", "write_weight", "in_features"]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, ExpertLinear)) or type(module).__name__ == "Conv1D"


def _transposed(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if _transposed(module) else module.weight.shape[1]


def read_weight(module: nn.Module, device: torch.device) -> torch.Tensor:
    """Returns a float32 `[out_features, in_features]` copy of the weight on `device`."""
    weight = module.weight.detach().to(device=device, dtype=torch.float32)
    return (weight.t() if _transposed(module) else weight).clone()


@torch.no_grad()
def write_weight(module: nn.Module, weight: torch.Tensor, name: str = "") -> None:
    """Writes a float32 `[out, in]` weight back in the module's dtype and layout; refuses non-finite values."""
    if isinstance(module, ExpertLinear):
        return module.write(weight, name)
    if not torch.isfinite(weight).all():
        raise FloatingPointError(f"Refusing to write non-finite values into the weight of {name or module}.")
    if _transposed(module):
        weight = weight.t()
    new = weight.to(dtype=module.weight.dtype, device=module.weight.device)
    new[new == 0] = 0.0  # canonical +0.0 (a -0.0 breaks some sparse kernels)
    module.weight.copy_(new)
    update_offloaded_tensor(module, "weight", module.weight)  # no-op unless accelerate offloads the module
