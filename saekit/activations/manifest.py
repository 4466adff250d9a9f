"""The saekit store's manifest: its format, dtypes and keys, read and checked (`read_manifest`), and
the error every store reader raises (`StoreError`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..plumbing.checks import whole_number
from ..plumbing.files import read_json_object

FORMAT = "saekit-activations"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class StoreError(RuntimeError):
    """An activation store that is missing, truncated or inconsistent with its manifest."""


def hook_file(hook: str) -> str:
    return hook.replace("/", "_")


MANIFEST_KEYS = {
    "format": str,
    "model": str,
    "hooks": list,
    "dtype": str,
    "seq_len": int,
    "n_sequences": int,
    # what reading a store relies on
    "shards": list,
    "n_rows": int,
    "tokens_sha256": str,
}
SHARD_KEYS = ("index", "seq_start", "seq_end", "n_rows")


def read_manifest(path: Path) -> dict:
    """A store's manifest, checked to be one before anything is read by it (a corrupt file is
    refused whole)."""
    mpath = Path(path) / "manifest.json"
    if not mpath.exists():
        raise StoreError(
            f"{path} is not an activation store: no manifest.json "
            "there (make one with `saekit capture`)"
        )
    m = read_json_object(mpath, StoreError, "re-run the capture into a new folder")
    if m.get("format") != FORMAT:
        raise StoreError(
            f"{mpath} is not a saekit activation manifest (format={m.get('format')!r})"
        )
    wrong = [k for k, t in MANIFEST_KEYS.items() if t is not int and not isinstance(m.get(k), t)]
    wrong += [
        f"shards[{i}]"
        for i, sh in enumerate(m.get("shards") or [])
        if not isinstance(sh, dict) or not all(isinstance(sh.get(k), int) for k in SHARD_KEYS)
    ]
    if wrong:
        raise StoreError(
            f"{mpath} is corrupt: missing or malformed {', '.join(wrong)}; re-run the capture "
            "into a new folder"
        )
    hook_names = lambda v: v and all(isinstance(h, str) and h for h in v)
    fields = [_field(m, k, "a whole number of 0 or more", _count) for k in _SIZES]
    fields.append(_field(m, "d_model", "a whole number of at least 1, or null", _width))
    fields.append(_field(m, "dtype", f"one of {', '.join(DTYPES)}", lambda v: v in DTYPES))
    fields.append(_field(m, "hooks", "a non-empty list of hook names", hook_names))
    bad = [f for f in fields if f]
    if bad:
        raise StoreError(
            f"{mpath} is corrupt: {'; '.join(bad)}. Re-run the capture into a new folder"
        )
    return m


_SIZES = ("seq_len", "n_sequences", "n_rows")


def _count(v) -> bool:
    return whole_number(v) is not None and v >= 0


def _width(v) -> bool:
    return v is None or (whole_number(v) is not None and v >= 1)


def _field(m: dict, key: str, expected: str, ok) -> str | None:
    """'field KEY is VALUE, expected ...' where m[key] fails `ok`; the whole number is kept."""
    if ok(m.get(key)):
        if key in _SIZES or key == "d_model" and m[key] is not None:
            m[key] = whole_number(m[key])
        return None
    return f"field '{key}' is {m.get(key)!r}, expected {expected}"
