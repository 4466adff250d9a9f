"""One writer per folder: an exclusive lock (fcntl.flock on a lock file) held by a write job from
opening the folder to its end, so two captures, exports or trainings can never mix their files in
one place.

The lock file records who holds it (process id, host, command, start time); a second writer is
refused at once with an error that names the holder. The kernel drops a flock when its process dies,
so a killed job leaves no stale lock. A job that locks a folder it already holds (a command calling
the library) simply re-enters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".saekit.lock"


class LockError(RuntimeError):
    """Another process is writing to the folder."""


_held: set[str] = set()  # the lock files this process holds


def lock_path(folder: str | Path, beside: bool = False) -> Path:
    """The lock file of `folder`: inside it, or beside it (`.NAME.saekit.lock`) for a folder
    replaced whole."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}{LOCK_FILE}" if beside else folder / LOCK_FILE


def holder(path: Path) -> str:
    """Who holds the lock file at `path`, in words (from what the holder wrote there)."""
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']}, running `{info['command']}` since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded itself yet)"


@contextlib.contextmanager
def writer_lock(folder: str | Path, job: str, beside: bool = False):
    """Hold the exclusive writer lock of `folder` (created if needed) for the `with` block, or raise
    LockError naming the process that holds it. `job` says what this writer does (shown to a
    refused second writer)."""
    path = lock_path(folder, beside)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held:  # the outer holder releases it
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockError(
            f"{Path(folder)} is being written by {holder(path)}; two writers would mix their "
            "files. Wait for that job to end (or stop it), or write to another folder."
        ) from None
    try:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "job": job,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else job,
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _held.add(key)
        yield path
    finally:
        _held.discard(key)
        os.close(fd)  # closing the file releases the flock
