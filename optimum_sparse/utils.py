"""Small helpers shared across the package: atomic writes and module-name matching."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Iterable, Union

import torch.nn as nn

__all__ = ["atomic_write_text", "atomic_write_bytes", "matches_any", "show_progress"]


_TRUE = ("1", "true", "yes", "on")


def show_progress(progress: bool = True) -> bool:
    """Whether to draw progress bars: `progress`, unless `TQDM_DISABLE` or `HF_HUB_DISABLE_PROGRESS_BARS` is set."""
    return bool(progress) and not any(os.environ.get(var, "").strip().lower() in _TRUE
                                      for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"))


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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
