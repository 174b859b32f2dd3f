"""Sparsity masks of a pruned model, recovered from its zeros (and cross-checked against a pruning record).

The one mask recovery lives in `optimum_sparse.serialization.masks` (live models and saved folders share its core);
these names stay importable from here.
"""

from ..serialization.masks import (
    NotPrunedError, SparsityMask, canonical_name, detect_structure, mask_from_weight, parse_pruning_record,
    recover_masks,
)

__all__ = [
    "SparsityMask", "recover_masks", "mask_from_weight", "detect_structure", "parse_pruning_record",
    "canonical_name", "NotPrunedError",
]
