"""Mask selection shared by every method: exact unstructured counts and exact N:M groups.

All functions take a score tensor (`[rows, cols]`, lower = pruned first) and return a boolean mask with
`True` where the weight is removed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["num_pruned", "layer_mask", "row_mask", "nm_mask", "select_mask"]


def num_pruned(numel: int, sparsity: float) -> int:
    """Number of weights removed from `numel` at `sparsity` (floor, with a guard against float error)."""
    return int(math.floor(numel * sparsity + 1e-9))


def layer_mask(scores: torch.Tensor, sparsity: float, count: Optional[int] = None) -> torch.Tensor:
    """Removes exactly `count` (default `num_pruned(numel, sparsity)`) lowest scores over the whole tensor.

    Selection by `kthvalue` (linear time); ties at the threshold are broken by position.
    """
    k = num_pruned(scores.numel(), sparsity) if count is None else count
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k).values
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Removes the lowest scores of every row, with the layer total exactly `num_pruned(numel, sparsity)`.

    Every row loses `floor(cols * sparsity)` weights; the few extra weights needed to reach the exact layer
    count go to the rows whose next candidate has the lowest score.
    """
    rows, cols = scores.shape
    per_row = int(math.floor(cols * sparsity + 1e-9))
    extra = num_pruned(rows * cols, sparsity) - rows * per_row
    k = min(per_row + (1 if extra > 0 else 0), cols)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k == 0:
        return mask
    values, idx = torch.topk(scores, k, dim=1, largest=False)
    keep = torch.ones_like(idx, dtype=torch.bool)
    if extra > 0 and k > per_row:
        keep[:, per_row] = False
        chosen = torch.topk(values[:, per_row], extra, largest=False).indices
        keep[chosen, per_row] = True
    mask.scatter_(1, idx, keep)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Removes the `n` lowest scores in every group of `m` consecutive columns (cols must divide by `m`)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}.")
    grouped = scores.reshape(rows, cols // m, m)
    idx = torch.topk(grouped, n, dim=2, largest=False).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.view(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]], per_row: bool) -> torch.Tensor:
    """N:M mask when `nm` is given, else a per-row (`per_row=True`) or whole-layer exact mask."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return row_mask(scores, sparsity) if per_row else layer_mask(scores, sparsity)
