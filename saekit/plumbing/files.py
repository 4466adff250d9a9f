"""Atomic writes (every file saekit writes appears whole or not at all), output folders checked
before the work, and OS errors as messages."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
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
    except OSError as e:
        cause = e.errno or _short_write_cause(tmp)  # numpy reports a short write without its cause
        Path(tmp).unlink(missing_ok=True)
        raise OSError(cause, os.strerror(cause), str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _short_write_cause(tmp: str) -> int:
    """Why a write stopped short: the size this process may write (ulimit -f) reached, else a
    full disk."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and os.path.getsize(tmp) >= soft - (1 << 16):
        return errno.EFBIG
    return errno.ENOSPC


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, lambda fh: np.save(fh, array))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(json.dumps(obj, indent=2).encode()))


def atomic_write_csv(path: Path, frame) -> None:
    """A pandas DataFrame as CSV (no index)."""
    atomic_write_bytes(path, lambda fh: fh.write(frame.to_csv(index=False).encode()))


def read_json_object(path: Path, error: type[Exception], fix: str) -> dict:
    """A JSON file that must hold an object (a manifest, a cfg.json): random bytes, invalid JSON or
    another JSON value raise `error` naming the file, what is wrong and `fix`."""
    try:
        value = json.loads(Path(path).read_text())
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
        raise error(f"{path} is corrupt ({e.__class__.__name__}: {e}); {fix}") from e
    if not isinstance(value, dict):
        raise error(
            f"{path} is corrupt: it holds a JSON {type(value).__name__}, not an object; {fix}"
        )
    return value


class OutputError(RuntimeError):
    """An output folder that cannot take what a command will write (not a folder, not writable,
    too little space)."""


MB = 1_000_000


def prepare_output(folder: str | Path, need_bytes: int = 0, what: str = "output folder") -> Path:
    """Create `folder` and check, before any work, that it is a folder, that files can be written in
    it and that it has about `need_bytes` free; an OutputError that names the problem and the fix
    otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the {what} {folder} is a file, not a folder; choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".saekit-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"cannot write in the {what} {folder} ({e.strerror or e}); choose a writable folder"
        ) from e
    require_space(folder, need_bytes)
    return folder


def require_space(folder: str | Path, need_bytes: int) -> None:
    """An OutputError naming both figures where the existing `folder`'s disk has less than
    `need_bytes` free."""
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise OutputError(no_space_message(folder, need_bytes, free))


def no_space_message(where: str | Path, need_bytes: int | None, free: int | None = None) -> str:
    """'no space left on WHERE: about N MB needed, M MB free' (either figure left out where
    unknown)."""
    if free is None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(_existing_parent(Path(where))).free
    parts = ([f"about {max(1, round(need_bytes / MB)):,} MB needed"] if need_bytes else []) + (
        [f"{free // MB:,} MB free"] if free is not None else []
    )
    return (
        f"no space left on {where}"
        + (f": {', '.join(parts)}" if parts else "")
        + "; free some space or choose a folder on another disk"
    )


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def os_error_message(e: OSError) -> str:
    """An OSError as one line that names the file and the fix (disk full, no permission, missing
    file, ...)."""
    where = e.filename or "the output"
    if e.errno == errno.ENOSPC:
        return no_space_message(where, None)
    if e.errno == errno.EFBIG:
        return (
            f"the file {where} grew past the size this process "
            "may write (ulimit -f); raise the limit"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({e.strerror}); choose a writable folder"
    return f"{e.strerror or e.__class__.__name__}: {where}" + (f" ({e})" if not e.strerror else "")


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_overlap(out: str | Path, inputs: dict, what: str = "output") -> None:
    """An OutputError, before anything is written, where the output `out` is one of the `inputs`
    ({label: path or None}), lies inside one or holds one: writing there could eat what is read."""
    target = Path(out).expanduser().resolve()
    for label, path in inputs.items():
        if path is None:
            continue
        source = Path(path).expanduser().resolve()
        relation = (
            "is"
            if target == source
            else "lies inside"
            if _inside(target, source)
            else "holds"
            if _inside(source, target)
            else None
        )
        if relation:
            raise OutputError(
                f"the {what} {out} {relation} the {label} {path}: writing there could destroy "
                f"what it reads. Choose another {what}, apart from the {label}"
            )


def local_path(name: str | Path | None) -> Path | None:
    """`name` as a path where it names a local file or folder (a model or corpus may also be a hub
    id), else None."""
    if name is None:
        return None
    path = Path(name).expanduser()
    return path if path.exists() else None
