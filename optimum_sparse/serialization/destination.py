"""Checks on where a pruned model will be saved, run before the (slow) load and pruning, and again before saving."""

from __future__ import annotations

import fnmatch
import os
import tempfile
from typing import Union

from ..atomic import check_replaceable
from ..errors import OutputPathError
from .record import WEIGHT_FILE_PATTERNS

__all__ = ["check_output_dir", "check_replaceable", "holds_model"]

_MODEL_FILES = ("config.json", "adapter_config.json")


def holds_model(folder: str) -> list[str]:
    """The model files (`config.json`, weights) found directly in `folder`, sorted; empty when none."""
    if not os.path.isdir(folder):
        return []
    return sorted(entry for entry in os.listdir(folder) if entry in _MODEL_FILES
                  or any(fnmatch.fnmatch(entry, pattern) for pattern in WEIGHT_FILE_PATTERNS))


def check_output_dir(path: Union[str, os.PathLike], overwrite: bool = False) -> str:
    """Checks that a pruned model can be saved at `path`; returns its absolute path.

    The folder is written atomically (built beside `path`, then swapped in), so `path` must not be a file, the
    filesystem root, the current directory or one of its parents, and its parent must be writable. A folder that
    already holds a model (`config.json` or weight files) is replaced only with `overwrite=True`.

    Raises:
        `OutputPathError` naming the problem and what to do.
    """
    final, parent, name = check_replaceable(path)
    existing = holds_model(final)
    if existing and not overwrite:
        raise OutputPathError(f"{final} already holds a model ({', '.join(existing[:3])}); pass overwrite=True (CLI: "
                              "--overwrite) to replace it, or choose another folder.")
    ancestor = parent
    while not os.path.isdir(ancestor):
        if os.path.lexists(ancestor):
            raise OutputPathError(f"Cannot create {final}: {ancestor} is a file, not a folder.")
        ancestor = os.path.dirname(ancestor)
    try:  # the save builds its temporary folder beside the target, so the parent must take new entries
        probe = tempfile.mkdtemp(prefix=f".{name}.probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as err:
        raise OutputPathError(f"Cannot write to {ancestor} (for {final}): {err.strerror or err}. Choose a writable "
                              "folder.") from None
    return final
