"""Atomic writes: every file saekit writes appears whole or not at all (a killed job never leaves half a file)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, lambda fh: np.save(fh, array))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(json.dumps(obj, indent=2).encode()))


def atomic_write_csv(path: Path, frame) -> None:
    """A pandas DataFrame as CSV (no index)."""
    atomic_write_bytes(path, lambda fh: fh.write(frame.to_csv(index=False).encode()))
