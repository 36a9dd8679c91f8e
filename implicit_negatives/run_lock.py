"""Exclusive run locks: one process at a time may use a training work folder, write an output name or write an
evaluation run directory.

The lock is an operating-system file lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on a small
file that names its holder. The system releases it when the holder dies, even by SIGKILL, so a lock is
never stale in the sense that matters; what a dead holder leaves is its name in the file, which the next
holder reports as taken over. A clean release empties and removes the file.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Iterator, Optional

WINDOWS_LOCK_OFFSET = 1 << 20  # msvcrt locks a byte range; lock one far past the holder's text so it stays readable


class RunLockedError(RuntimeError):
    """Another live process holds the lock; the message names it and what to do."""


def _try_lock(descriptor: int) -> bool:
    try:
        if os.name == "nt":
            import msvcrt
            os.lseek(descriptor, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _read(descriptor: int) -> str:
    os.lseek(descriptor, 0, os.SEEK_SET)
    return os.read(descriptor, 4096).decode("utf-8", "replace").strip()


def _release(descriptor: int, path: str) -> None:
    os.ftruncate(descriptor, 0)
    if os.name == "nt":  # an open file cannot be removed on Windows; a newer holder keeping it open is fine
        os.close(descriptor)
        with contextlib.suppress(OSError):
            os.remove(path)
    else:  # remove while still holding, so a process that opened the old file sees it vanish and retries
        os.remove(path)
        os.close(descriptor)


@contextlib.contextmanager
def run_lock(path: str, what: str, by: str = "trainer") -> Iterator[Optional[str]]:
    """Hold the lock file ``path`` (for ``what``, e.g. "work folder X"; ``by``: who holds such locks, for the
    message) while the block runs.

    Yields the holder text a dead process left behind ("pid 123 on host, since ...") when this process
    took its lock over, else None. Raises RunLockedError at once if a live process holds it.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(descriptor):
            holder = _read(descriptor) or "another process"
            os.close(descriptor)
            raise RunLockedError(f"{what} is in use by a running {by} ({holder}); wait for it to finish, "
                                 f"or give this run another name or folder")
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(descriptor), os.stat(path)):
                break
        os.close(descriptor)  # the holder released and removed the file meanwhile: lock the current one
    previous = _read(descriptor) or None
    started = datetime.datetime.now().astimezone().replace(microsecond=0).isoformat()
    os.ftruncate(descriptor, 0)
    os.lseek(descriptor, 0, os.SEEK_SET)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
    try:
        yield previous
    finally:
        _release(descriptor, path)
