"""A saekit store's files checked against its manifest when it opens: each shard's files there,
of the manifest's dtype and shape, its positions inside its sequences, and the token and document
ids readable, in range and the ones the manifest names.

Reading a file's values (the token hash, the ranges) costs seconds at a billion tokens, so a capture
that finishes records its files in CHECKED (each one's size and mtime, and the manifest's hash); an
open reads only the headers of files that have not changed since. Opening never writes: a store
without the record (older, or copied without its times) is checked in full each time."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..data import tokens_sha256
from ..plumbing.files import atomic_write_json
from .manifest import _NP_DTYPES, StoreError

CHECKED = ".saekit_checked.json"  # files whose values passed, by their stat


def check_files(store) -> _Checked:
    """Every file of `store` against its manifest: shard files, dtypes and shapes, positions in
    range, token ids and document ids; a StoreError naming the file otherwise. Returns what passed
    (`_Checked.save` records it)."""
    want_np = np.dtype(_NP_DTYPES[store.dtype])
    checked = _Checked(store.path, store.manifest)
    _check_tokens(store, checked)
    total = 0
    for sh in store.shards:
        if (
            sh.get("tokens_sha256", store.manifest["tokens_sha256"])
            != store.manifest["tokens_sha256"]
        ):
            raise StoreError(
                f"store {store.path}: shard {sh['index']} was captured from other tokens than "
                "the manifest's (two captures mixed in one folder); "
                "capture again into a new folder"
            )
        pos = store._open(sh, "pos")
        if pos.shape != (sh["n_rows"], 2) or pos.dtype.kind not in "iu":
            raise StoreError(
                f"store {store.path}: shard {sh['index']} positions are {pos.dtype} "
                f"{pos.shape}, the manifest says integers of shape ({sh['n_rows']}, 2)"
            )
        if not checked.unchanged(f"shards/{sh['index']:05d}.pos.npy"):
            _check_positions(store, sh, pos)
            checked.passed(f"shards/{sh['index']:05d}.pos.npy")
        for h in store.hooks:
            a = store._open(sh, h)
            if a.shape != (sh["n_rows"], store.d_model) or a.dtype != want_np:
                raise StoreError(
                    f"store {store.path}: shard {sh['index']} of hook {h} has shape {a.shape} "
                    f"and dtype {a.dtype}; "
                    f"the manifest says ({sh['n_rows']}, {store.d_model}) {store.dtype}. The "
                    "store is inconsistent: "
                    f"capture again into a new folder."
                )
        total += sh["n_rows"]
    if total != store.manifest["n_rows"]:
        raise StoreError(
            f"store {store.path}: shards hold {total} rows, manifest says "
            f"{store.manifest['n_rows']}"
        )
    return checked


def _check_positions(store, shard: dict, pos: np.ndarray) -> None:
    """Every row's (sequence, position) inside the shard's sequences and the sequence length:
    a row placed outside them would be paired with another token's text."""
    if not len(pos):
        return
    bounds = (
        ("sequence", pos[:, 0], shard["seq_start"], shard["seq_end"]),
        ("position", pos[:, 1], 0, store.manifest["seq_len"]),
    )
    for what, values, lo, hi in bounds:
        low, high = int(values.min()), int(values.max())
        if low < lo or high >= hi:
            bad = low if low < lo else high
            raise StoreError(
                f"store {store.path}: shards/{shard['index']:05d}.pos.npy holds {what} {bad}, "
                f"outside [{lo}, {hi - 1}] for this shard; the file is damaged. Capture again "
                "into a new folder"
            )


def _check_tokens(store, checked: _Checked) -> None:
    """tokens.npy and doc_ids.npy readable, [n_sequences, seq_len], and the tokens the
    manifest names."""
    want = (store.manifest["n_sequences"], store.manifest["seq_len"])
    for name in ("tokens.npy", "doc_ids.npy"):
        f = store.path / name
        if not f.exists():
            raise StoreError(
                f"store {store.path}: {name} is missing; capture again into a new folder"
            )
        try:
            arr = np.load(f, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise StoreError(
                f"store {store.path}: {name} is truncated or corrupt "
                f"({e}); capture again into a new folder"
            ) from e
        if arr.shape != want or arr.dtype.kind not in "iu":
            raise StoreError(
                f"store {store.path}: {name} holds {arr.dtype} {arr.shape}, the manifest says "
                f"integers of shape {want}; capture again into a new folder"
            )
        if checked.unchanged(name):
            continue
        least = -1 if name == "doc_ids.npy" else 0  # -1 marks BOS and padding positions
        if arr.size and int(arr.min()) < least:
            raise StoreError(
                f"store {store.path}: {name} holds {int(arr.min())}, below {least}; the file is "
                "damaged. Capture again into a new folder"
            )
        if name == "tokens.npy" and tokens_sha256(arr) != store.manifest["tokens_sha256"]:
            raise StoreError(
                f"store {store.path}: tokens.npy is not the one the manifest was "
                "written for (two captures mixed in one folder, or the file was "
                "replaced); capture again into a new folder"
            )
        checked.passed(name)


class _Checked:
    """The files of a store whose values passed, as CHECKED records them: a file counts as
    checked while its size and mtime, and the manifest it was checked against, are the ones
    recorded."""

    def __init__(self, folder, manifest: dict):
        self.folder = folder
        self.manifest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        try:
            self.seen = json.loads((folder / CHECKED).read_text())
        except (OSError, ValueError):
            self.seen = {}
        self.now = {}

    def _stat(self, name: str) -> list:
        st = os.stat(self.folder / name)
        return [st.st_size, st.st_mtime_ns, self.manifest]

    def unchanged(self, name: str) -> bool:
        stat = self._stat(name)
        if self.seen.get(name) == stat:
            self.now[name] = stat
            return True
        return False

    def passed(self, name: str) -> None:
        self.now[name] = self._stat(name)

    def save(self) -> None:
        """Record every file that passed (a capture, once it is complete)."""
        atomic_write_json(self.folder / CHECKED, self.now)
