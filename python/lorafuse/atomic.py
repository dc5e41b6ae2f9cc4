"""Atomic file writes: a reader (or a process restarted after a kill) sees every file under its
final name either complete-new or complete-old, never partial.

Each file is written to a temporary name in its final directory, flushed and fsynced, moved
over the final name with ``os.replace`` (atomic on POSIX and Windows), and the directory is
fsynced so that the rename itself survives a crash. A killed writer may leave a hidden
temporary (``.name.*.tmp`` or ``.lorafuse-save-*/``) behind; loaders never look at it.
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
    """Run ``write(staging)`` — anything that fills a directory, e.g. PEFT's ``save_pretrained`` —
    into a hidden staging folder inside ``directory``, then move each file it wrote to the same
    relative path under ``directory`` with `os.replace` (config files last in each folder).

    Files of ``directory`` that ``write`` does not produce are left alone. If ``write`` raises,
    nothing in ``directory`` has changed (a ``directory`` this call created is removed again); the
    staging folder is removed in every case.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"Provided path ({directory}) should be a directory, not a file")
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".lorafuse-save-", dir=directory)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # nothing of this call left behind (rmdir: only while it is still empty)
            os.rmdir(directory)
        raise
    try:
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
