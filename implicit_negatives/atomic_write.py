"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every file the pack writes (embeddings, resume states, latent caches, images, tables, run records) goes
through ``atomic_path``: the data is written to a uniquely named temporary file in the target's own folder
(so ``os.replace`` stays on one filesystem and two writers never share a temporary name), flushed to disk,
then renamed over the target. A crash or SIGKILL leaves at most a ``*.partial`` file, which readers ignore
and ``remove_partials_of_dead_processes`` deletes (its name carries the writer's process id).
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
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=PARTIAL_SUFFIX,
                                    dir=folder)
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


def process_alive(pid_text: str) -> bool:
    """Whether ``pid_text`` is the id of a process running on this machine."""
    import psutil  # a ComfyUI requirement; os.kill(pid, 0) would terminate the process on Windows
    return pid_text.isdigit() and int(pid_text) > 0 and psutil.pid_exists(int(pid_text))


def remove_partials_of_dead_processes(root: str) -> list[str]:
    """Delete the ``*.partial`` files under ``root`` whose writer (the process id in the name,
    ``.<name>.<pid>.<random>.partial``) no longer runs: what a SIGKILL left. Returns the removed paths."""
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            parts = name[:-len(PARTIAL_SUFFIX)].rsplit(".", 2) if name.endswith(PARTIAL_SUFFIX) else []
            if len(parts) == 3 and not process_alive(parts[1]):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


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
