"""Structured pruning: whole MLP channels and attention heads (KV groups) removed, linears physically shrunk.

- `layout`: where heads and channels live in each supported architecture;
- `scoring`: input statistics of output projections and the shared OBS / least-squares math;
- `allocation`: kept sizes per module (uniform, closed-form threshold, softmax-energy), rounded to `multiple_of`;
- `shrink`: the physical slicing and the config update (stock fields, or per-layer shapes + `modeling_pruned.py`);
- `runner`: the block-sequential loop used by `SparsePruner.apply` when `PruningConfig.structure` is structured;
- `base`: the interface of the structured methods (`optimum_sparse.methods.structprune`, `flap`, `wanda_structured`).
"""

from .base import ALLOCATIONS, GroupDecision, StructuredMethod
from .layout import STRUCTURED_LAYOUTS, StructuredLayout, get_structured_layout

__all__ = ["ALLOCATIONS", "GroupDecision", "StructuredMethod", "STRUCTURED_LAYOUTS", "StructuredLayout",
           "get_structured_layout"]
