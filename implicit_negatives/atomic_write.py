"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every file the pack writes (embeddings, resume states, latent caches, images, tables, run records) goes
through ``atomic_path``: the data is written to a uniquely named temporary file in the target's own folder
(so ``os.replace`` stays on one filesystem and two writers never share a temporary name), flushed to disk,
then renamed over the target. A crash or SIGKILL leaves at most a ``*.partial`` file, which readers ignore.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=PARTIAL_SUFFIX, dir=folder)
    os.close(handle)
    try:
        yield temp
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the user's usual mode
        os.replace(temp, path)
        _fsync_folder(folder)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def atomic_copy(source: str, target: str) -> None:
    with atomic_path(target) as temp:
        shutil.copyfile(source, temp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable where the platform allows (POSIX); Windows has no folder handles."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
