"""`atomic_directory` for pruned-model folders: `optimum_sparse.atomic.atomic_directory` (the package's one atomic-write
module) with our files and transformers' weight files never carried over from the previous folder."""

from __future__ import annotations

import os
from typing import ContextManager, Union

from ..atomic import atomic_directory as _atomic_directory
from .record import OUR_FILES, WEIGHT_FILE_PATTERNS

__all__ = ["atomic_directory"]


def atomic_directory(path: Union[str, os.PathLike], fsync: bool = True) -> ContextManager[str]:
    """Yields a temporary sibling folder that replaces `path` in one step on success (`optimum_sparse.atomic`).

    Example:

    ```python
    >>> with atomic_directory("out") as tmp:
    ...     model.save_pretrained(tmp)
    ```
    """
    return _atomic_directory(path, fsync=fsync, regenerated=OUR_FILES + WEIGHT_FILE_PATTERNS)
