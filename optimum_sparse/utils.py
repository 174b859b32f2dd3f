"""Small helpers shared across the package: module-name matching, hooked calibration passes (and the atomic file
writes of `optimum_sparse.atomic`, re-exported)."""

from __future__ import annotations

import os
import re
from typing import Iterable

import torch.nn as nn

from .atomic import atomic_write, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "matches_any", "show_progress", "forward_batches"]


_TRUE = ("1", "true", "yes", "on")


def show_progress(progress: bool = True) -> bool:
    """Whether to draw progress bars: `progress`, unless `TQDM_DISABLE` or `HF_HUB_DISABLE_PROGRESS_BARS` is set."""
    return bool(progress) and not any(os.environ.get(var, "").strip().lower() in _TRUE
                                      for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"))


def matches_any(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    """True when a module matches one of `patterns`.

    A pattern is a class name (`"Linear"`, which also matches subclasses such as Falcon's `FalconLinear`), a dotted
    name suffix (`"mlp.down_proj"`, matched on whole components), or a regex prefixed with `re:` (searched in the full
    module name).
    """
    class_names = {cls.__name__ for cls in type(module).__mro__}
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif pattern in class_names:
            return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def forward_batches(model: nn.Module, input_ids, batch_size: int, handles: list, desc: str, progress: bool = True) -> None:
    """Runs `model` on `input_ids` `[n, L]` in batches of `batch_size` rows (no cache, no gradients) and removes the
    hook `handles` afterwards, whatever happens; the hooks collect what the caller needs."""
    import torch
    from tqdm.auto import tqdm

    device = model.get_input_embeddings().weight.device
    if device.type == "meta":  # offloaded embeddings: accelerate moves the inputs
        device = torch.device("cpu")
    try:
        with torch.no_grad():
            for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, disable=not progress):
                model(input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
