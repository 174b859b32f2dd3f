"""Calibration statistics of a linear layer's input, collected by the engine and read by the methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["LinearStats"]


@dataclass
class LinearStats:
    """Calibration statistics of one linear layer's input.

    Each calibration window's `x xᵀ` is computed in float32 and summed in float64, so the sums do not depend on how
    the windows were batched or split across processes (a window's product is the same in any batch); `finalize`
    casts them to float32 once every window (and every rank) has been added.

    Attributes:
        hessian (`torch.Tensor`, *optional*): `Σ x xᵀ` over calibration tokens, `[in, in]`.
        sq_norms (`torch.Tensor`, *optional*): `Σ x_j²` per input feature, `[in]` (the diagonal of `hessian`).
        num_tokens (`int`): Number of tokens accumulated.
    """

    hessian: Optional[torch.Tensor] = None
    sq_norms: Optional[torch.Tensor] = None
    num_tokens: int = 0

    def add(self, inputs: torch.Tensor, want_hessian: bool) -> None:
        """Adds a batch: `[windows, tokens, in]` (one product per window) or `[tokens, in]` (one window)."""
        x = inputs.to(torch.float32)
        windows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        features = x.shape[-1]
        if want_hessian and self.hessian is None:
            self.hessian = torch.zeros(features, features, dtype=torch.float64, device=x.device)
        if self.sq_norms is None:
            self.sq_norms = torch.zeros(features, dtype=torch.float64, device=x.device)
        for window in windows:
            if want_hessian:
                self.hessian.add_(window.t() @ window)
            self.sq_norms.add_((window * window).sum(0))
        self.num_tokens += windows.shape[0] * windows.shape[1]

    def finalize(self) -> "LinearStats":
        """Casts the float64 sums to float32 (call after the last `add` and any all-reduce); returns `self`."""
        if self.hessian is not None:
            self.hessian = self.hessian.to(torch.float32)
        if self.sq_norms is not None:
            self.sq_norms = self.sq_norms.to(torch.float32)
        return self
