"""Numerically careful linear algebra: damped Cholesky with escalating damping."""

from __future__ import annotations

import logging

import torch

from ..errors import NonFiniteActivationError

__all__ = ["SymmetricGram", "damped_cholesky", "inverse_cholesky_upper", "prepare_hessian"]

logger = logging.getLogger(__name__)


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Returns a float32 copy of `hessian` with dead inputs (zero diagonal) made harmless.

    Columns that never saw a non-zero input carry no information: their diagonal is set to 1 and the matching
    weight columns are zeroed in place, as in the OBS literature.
    """
    hessian = hessian.to(torch.float32).clone()
    dead = torch.diag(hessian) == 0
    if dead.any():
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
    return hessian


class SymmetricGram:
    """Accumulates `Σ xᵀx` over chunks computing only its upper block triangle (10/16 of the products with 4 parts).

    Call `add` per chunk, `all_reduce` the partial `matrix` if needed, then `symmetric()` once for the full matrix.
    """

    def __init__(self, size: int, device=None, dtype=torch.float32, parts: int = 4):
        parts = max(1, min(parts, size))
        self.edges = [size * i // parts for i in range(parts + 1)]
        self.matrix = torch.zeros(size, size, device=device, dtype=dtype)

    def zero_(self) -> "SymmetricGram":
        self.matrix.zero_()
        return self

    def add(self, x: torch.Tensor) -> None:
        for start, end in zip(self.edges[:-1], self.edges[1:]):
            self.matrix[start:end, start:].addmm_(x[:, start:end].t(), x[:, start:])

    def symmetric(self) -> torch.Tensor:
        """The full matrix (the strict lower blocks mirrored from the upper ones), in place."""
        for start, end in zip(self.edges[1:-1], self.edges[2:]):
            self.matrix[start:end, :start] = self.matrix[:start, start:end].t()
        return self.matrix


def damped_cholesky(matrix: torch.Tensor, damping: float, max_tries: int = 8) -> torch.Tensor:
    """Lower Cholesky factor of `matrix + λ·mean(diag)·I`, escalating λ ×10 on each failure.

    Raises:
        `NonFiniteActivationError` when the matrix is not finite; `torch.linalg.LinAlgError` when it is still not
        positive definite after `max_tries` escalations.
    """
    if not torch.isfinite(matrix).all():
        raise NonFiniteActivationError("The Hessian (Σ x xᵀ of the calibration inputs) has non-finite entries: "
                                       "the inputs overflowed (float16?); prune in bfloat16 or float32.")
    diag_mean = torch.diag(matrix).mean().clamp_min(1e-12)
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    lam = damping
    for attempt in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(matrix + lam * diag_mean * eye)
        if int(info) == 0 and torch.isfinite(factor).all():
            if attempt:
                logger.warning("Cholesky needed damping %.3g (asked %.3g).", lam, damping)
            return factor
        lam *= 10.0
    raise torch.linalg.LinAlgError(f"Matrix not positive definite even with damping {lam / 10:.3g}.")


def inverse_cholesky_upper(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the damped `hessian` (the OBS update rows).

    If the inverse itself fails to factor (float32 round-off), damping escalates again.
    """
    lam = damping
    for _ in range(8):
        lower = damped_cholesky(hessian, lam)
        inverse = torch.cholesky_inverse(lower)
        factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
        if int(info) == 0 and torch.isfinite(factor).all():
            return factor
        lam *= 10.0
    raise torch.linalg.LinAlgError(f"Inverse Hessian not positive definite even with damping {lam / 10:.3g}.")
