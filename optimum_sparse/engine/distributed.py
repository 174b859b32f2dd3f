"""Several processes (`torchrun`, `accelerate launch`): calibration samples split across ranks, statistics summed.

When `torch.distributed` is initialised with more than one process, each rank keeps every `world_size`-th calibration
window (so it holds 1/N of the activations), accumulates its statistics locally, and the sums are all-reduced before
any method uses them (`XᵀX`, input norms, token counts, SparseLLM's normal-equation terms). Every rank then runs the
same deterministic solves on the same sums and writes the same weights. The per-linear statistics are sums of
per-window float32 products taken in float64 (`LinearStats`), so they do not depend on how windows are batched or
split, and N processes give bit for bit the model one process gives (with as many threads per process; SparseLLM's
float32 normal-equation sums only up to summation order).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["world", "shard_rows", "all_reduce_sum", "all_reduce_scalar"]


def world() -> tuple[int, int]:
    """`(rank, world_size)` of the current `torch.distributed` group, `(0, 1)` when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_rows(input_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's calibration windows: rows `rank, rank + N, ...` of `input_ids`."""
    rank, size = world()
    if input_ids is None or size == 1:
        return input_ids
    if input_ids.shape[0] < size:
        raise ValueError(
            f"{input_ids.shape[0]} calibration windows cannot be split across {size} processes; use at least {size}."
        )
    return input_ids[rank::size]


def _backend_device(tensor: torch.Tensor) -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if tensor.device.type != "cpu" and backend == "gloo" else tensor.device


def all_reduce_sum(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Sums `tensor` over all ranks in place (a no-op in a single process); returns it."""
    if tensor is None or world()[1] == 1:
        return tensor
    device = _backend_device(tensor)
    if device == tensor.device:
        torch.distributed.all_reduce(tensor)
    else:
        staged = tensor.to(device)
        torch.distributed.all_reduce(staged)
        tensor.copy_(staged)
    return tensor


def all_reduce_scalar(value: float) -> float:
    """Sums a Python number over all ranks (float64)."""
    if world()[1] == 1:
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64)))
