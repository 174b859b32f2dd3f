"""Mask selection shared by every method: exact unstructured counts and exact N:M groups.

All functions take a score tensor (`[rows, cols]`, lower = pruned first) and return a boolean mask with
`True` where the weight is removed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["num_pruned", "layer_mask", "row_mask", "nm_mask", "select_mask", "layer_nm", "nm_step"]


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


def nm_step(sparsity: float, m: int) -> int:
    """`N` such that `sparsity == N / m`; raises `ValueError` when `sparsity` is not a multiple of `1/m` in `[0, 1)`."""
    n = round(sparsity * m)
    if abs(sparsity * m - n) > 1e-6 or not 0 <= n < m:
        allowed = ", ".join(f"{k}/{m}" for k in range(m))
        raise ValueError(f"sparsity {sparsity!r} is not an N:M pattern with M={m}: it must be a multiple of 1/{m} "
                         f"below 1 ({allowed}).")
    return n


def layer_nm(nm: Optional[tuple[int, int]], sparsity: float) -> Optional[tuple[int, int]]:
    """The N:M pattern of one layer: `(N_i, M)` with `N_i = sparsity · M` (layer-wise N:M allocation: the run's
    structure fixes M, the layer's sparsity gives N; a uniform run passes `N/M`), or `None` for unstructured runs.

    Raises:
        ValueError: `sparsity` is not a multiple of `1/M`.
    """
    if nm is None:
        return None
    return nm_step(sparsity, nm[1]), nm[1]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Removes the `n` lowest scores in every group of `m` consecutive columns (cols must divide by `m`; `n = 0`
    removes nothing)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M sparsity needs the input size ({cols}) to be a multiple of M={m}.")
    if n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
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
