"""Atomic writes, the package's one module for them: a file is written beside its target and renamed over it; a folder
is built beside its target and swapped into place in one step. A crash, a full disk or a killed process never leaves
a half-written file or folder where a good one was."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import logging
import os
import shutil
import sys
import tempfile
import uuid
from typing import Callable, Iterator, Union

from .errors import OutputPathError

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_directory", "check_replaceable"]

logger = logging.getLogger(__name__)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Writes a file atomically: `write(tmp)` fills a temporary file in the same folder, which is flushed to disk and
    renamed over `path`; on any error the temporary file is removed and `path` is untouched.

    Every file the package writes goes through it (`atomic_write_bytes`, `atomic_write_text`, the resumable run's
    safetensors files); whole folders are swapped by `atomic_directory`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> None:
    """Writes `data` to `path` atomically (`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_replaceable(path: Union[str, os.PathLike]) -> tuple[str, str, str]:
    """`(absolute path, parent, name)` of a folder a save may replace as a whole; raises `OutputPathError` for an
    empty name, the filesystem root, a file, or the current directory and its parents."""
    if path is None or not os.fspath(path).strip():
        raise OutputPathError("The output folder is empty; give a folder name (e.g. 'pruned/').")
    final = os.path.abspath(os.fspath(path)).rstrip(os.sep) or os.sep
    parent, name = os.path.split(final)
    if not name:
        raise OutputPathError(f"Refusing to save into the filesystem root {final!r}; give a folder below it.")
    if os.path.lexists(final) and not os.path.isdir(final):
        raise OutputPathError(f"The output {final} exists and is a file, not a folder; choose a folder name.")
    cwd, real = os.path.realpath(os.getcwd()), os.path.realpath(final)
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise OutputPathError(f"Refusing to save into {final}: it is the current directory or one of its parents, and "
                              "the save replaces the folder as a whole; give a new folder such as 'pruned/'.")
    return final, parent, name


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swaps two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover_stale(parent: str, name: str) -> None:
    """Cleans up after a save that was killed: drops its temporary folder, restores a folder moved aside."""
    for entry in os.listdir(parent):
        for kind in ("tmp", "old"):
            prefix = f".{name}.{kind}-"
            if not entry.startswith(prefix):
                continue
            try:
                pid = int(entry[len(prefix):].split("-", 1)[0])
            except ValueError:
                continue
            if pid == os.getpid() or _pid_alive(pid):
                continue
            stale, target = os.path.join(parent, entry), os.path.join(parent, name)
            if kind == "old" and not os.path.exists(target):
                logger.warning("Restoring %s, left aside by an interrupted save.", target)
                os.rename(stale, target)
            else:
                shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str, regenerated: tuple) -> None:
    """Copies entries of the previous folder that the new save did not write (a `.git`, user notes, logs), except
    those matching `regenerated` (files the save itself produces: a stale one must not survive)."""
    for entry in os.listdir(old):
        if os.path.lexists(os.path.join(new, entry)):
            continue
        if any(fnmatch.fnmatch(entry, p) for p in regenerated):
            continue
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


@contextlib.contextmanager
def atomic_directory(path: Union[str, os.PathLike], fsync: bool = True, regenerated: tuple = ()) -> Iterator[str]:
    """Yields a temporary sibling folder; on success it replaces `path` in one step, on failure it is removed.

    The previous content of `path` stays untouched until the new folder is complete. On Linux the swap is a single
    `renameat2(RENAME_EXCHANGE)`; elsewhere the old folder is renamed aside first (a crash between the two renames is
    repaired by the next save). Entries of the old folder that the new save does not write (a `.git` folder, notes)
    are carried over, except those matching a pattern of `regenerated` (`fnmatch`; e.g. stale weight files).

    Example:

    ```python
    >>> with atomic_directory("out") as tmp:
    ...     model.save_pretrained(tmp)
    ```
    """
    path, parent, name = check_replaceable(path)  # OutputPathError: root, a file, the current directory
    os.makedirs(parent, exist_ok=True)
    _recover_stale(parent, name)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)  # mode 0o777 minus the umask, like a folder transformers would create
    try:
        if os.path.isdir(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        yield tmp
        if os.path.isdir(path) and os.listdir(path):
            _carry_over(path, tmp, tuple(regenerated))
        if fsync:
            _fsync_tree(tmp)
        if not os.path.isdir(path) or not os.listdir(path):
            os.replace(tmp, path)  # replaces a missing or empty folder atomically
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
        else:
            aside = os.path.join(parent, f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside, path)  # put the previous version back
                raise
            shutil.rmtree(aside, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
