"""Atomic file writes: a reader (or a process restarted after a kill) sees every file under its
final name either complete-new or complete-old, never partial.

Each file is written to a temporary name in its final directory, flushed and fsynced, moved
over the final name with ``os.replace`` (atomic on POSIX), and the directory is fsynced so that
the rename itself survives a crash; a new directory is staged beside its final name and renamed
into place whole. A killed writer may leave a hidden temporary (``.name.*.tmp``,
``.lorafuse-save-*/`` inside the directory, or ``.<name>.lorafuse-save-*/`` beside it) behind;
loaders never look at it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_directory_write"]

# written last in each directory: a config names its weights, so it must not be newer than them
_LAST = ("adapter_config.json",)


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, replace, fsync dir."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write: data must be bytes, got {type(data).__name__}")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; ordinary files are 0644
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_directory_write(directory: str, write: Callable[[str], None]) -> None:
    """Run ``write(staging)`` — anything that fills a directory, e.g. PEFT's ``save_pretrained`` — into a
    hidden staging folder, then put what it wrote in place:

    - ``directory`` missing or empty: the staging folder (a sibling in the same parent) is renamed to
      ``directory`` in one step — a reader sees nothing or the whole new directory;
    - ``directory`` holding files: each file is moved to the same relative path with `os.replace`
      (config files last in each folder), so each file is complete-old or complete-new; files ``write``
      does not produce are left alone.

    If ``write`` raises, nothing in ``directory`` has changed; the staging folder is removed in every case.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"Provided path ({directory}) should be a directory, not a file")
    directory = os.path.abspath(directory)
    fresh = not os.path.exists(directory) or not os.listdir(directory)
    if fresh:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.lorafuse-save-",
                                   dir=os.path.dirname(directory))
    else:
        staging = tempfile.mkdtemp(prefix=".lorafuse-save-", dir=directory)
    try:
        write(staging)
        if fresh:
            _fsync_tree(staging)
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a saved adapter is an ordinary folder
            os.replace(staging, directory)  # onto a missing or empty directory: one atomic rename
            _fsync_dir(os.path.dirname(directory))
            return
        for root, dirs, files in os.walk(staging):
            dirs.sort()
            target = os.path.join(directory, os.path.relpath(root, staging))
            os.makedirs(target, exist_ok=True)
            for name in sorted(files, key=lambda n: (n in _LAST, n)):
                _fsync_file(os.path.join(root, name))
                os.replace(os.path.join(root, name), os.path.join(target, name))
            _fsync_dir(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(top: str) -> None:
    """fsync every file and folder under ``top`` (before a rename makes them visible)."""
    for root, _dirs, files in os.walk(top):
        for name in files:
            _fsync_file(os.path.join(root, name))
        _fsync_dir(root)
