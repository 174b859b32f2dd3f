"""SparseGPT (Frantar & Alistarh, 2023): OBS mask selection with lazy-batch error compensation.

For a layer with input Hessian `H = Σ x xᵀ`, the mask is chosen by `w² / [H⁻¹]_jj²` inside column blocks and
the error of each removed weight is propagated to the not-yet-processed columns through the upper Cholesky
factor of `H⁻¹`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import PruningMethod, register_method
from .linalg import inverse_cholesky_upper, prepare_hessian
from .masks import layer_mask, nm_mask, num_pruned

__all__ = ["SparseGPTPruning", "sparsegpt_prune", "sparsegpt_factor"]


def sparsegpt_factor(hessian: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """`(upper Cholesky factor of H⁻¹, dead-input mask)`: reusable for every weight pruned on the same `hessian`."""
    dead = torch.diag(hessian) == 0
    H = prepare_hessian(hessian, torch.empty(0, hessian.shape[0], device=hessian.device))
    return inverse_cholesky_upper(H, damping), dead


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: Optional[tuple[int, int]] = None,
    block_size: int = 128,
    damping: float = 0.01,
    factor: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes `weight` (`[out, in]`) against the input Hessian `hessian` (`[in, in]`).

    Unstructured sparsity removes exactly `num_pruned(weight.numel(), sparsity)` weights: each column block
    removes its share of the cumulative count. N:M removes N weights in every M consecutive inputs.

    Args:
        weight (`torch.Tensor`): weights, converted to float32 (a new tensor is returned).
        hessian (`torch.Tensor`): `Σ x xᵀ` (any positive scale).
        sparsity (`float`): fraction of zeros (unstructured).
        nm (`tuple[int, int]`, *optional*): N:M structure (`N = 0`: the weight is returned unchanged).
        block_size (`int`): columns processed per lazy batch.
        damping (`float`): relative damping (fraction of the mean diagonal), escalated on failure.
        factor (`tuple`, *optional*): `sparsegpt_factor(hessian, damping)`, when several weights share `hessian`.

    Returns:
        `(weight, mask)` with `mask == True` where weights were removed; removed weights are exactly `+0.0`.
    """
    W = weight.to(torch.float32).clone()
    rows, cols = W.shape
    if nm is not None and nm[0] == 0:  # a 0:M layer (layer-wise N:M allocation) stays dense
        return W, torch.zeros_like(W, dtype=torch.bool)
    Hinv, dead = factor if factor is not None else sparsegpt_factor(hessian, damping)
    W[:, dead] = 0.0
    total = num_pruned(W.numel(), sparsity)
    mask = torch.zeros_like(W, dtype=torch.bool)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        count = end - start
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        diag = torch.diag(Hinv1)
        if nm is None:
            # cumulative allocation keeps the layer count exact whatever the block boundaries
            k = num_pruned(rows * end, sparsity) - num_pruned(rows * start, sparsity)
            if end == cols:
                k = total - int(mask[:, :start].sum())
            mask1 = layer_mask(W1.pow(2) / diag.pow(2).unsqueeze(0), sparsity, count=k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = diag[i]
            if nm is not None and i % nm[1] == 0:
                scores = W1[:, i : i + nm[1]].pow(2) / diag[i : i + nm[1]].pow(2).unsqueeze(0)
                mask1[:, i : i + nm[1]] = nm_mask(scores, *nm)
            q = w.clone()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, start:end] = Q1
        mask[:, start:end] = mask1
        W[:, end:] -= Err1 @ Hinv[start:end, end:]

    W[mask] = 0.0  # +0.0, never -0.0
    return W, mask


@register_method
class SparseGPTPruning(PruningMethod):
    name = "sparsegpt"
    stats = "hessian"
    column_blocks = True

    def __init__(self, config):
        super().__init__(config)
        self._last_factor: Optional[tuple] = None  # (hessian, factor): q/k/v and gate/up share one Hessian

    def prune_weight(self, weight, stats, sparsity):
        if self._last_factor is None or self._last_factor[0] is not stats.hessian:
            self._last_factor = (stats.hessian, sparsegpt_factor(stats.hessian, self.config.damping))
        return sparsegpt_prune(
            weight,
            stats.hessian,
            sparsity,
            nm=self.layer_nm(sparsity),
            block_size=self.config.block_size,
            damping=self.config.damping,
            factor=self._last_factor[1],
        )
