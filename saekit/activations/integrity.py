"""A saekit store's files checked against its manifest when it opens: each shard's files there,
of the manifest's dtype and shape, its positions inside its sequences, and the token and document
ids readable, in range and the ones the manifest names."""

from __future__ import annotations

import numpy as np

from ..data import tokens_sha256
from .manifest import _NP_DTYPES, StoreError


def check_files(store) -> None:
    """Every file of `store` against its manifest: shard files, dtypes and shapes, positions in
    range, token ids and document ids; a StoreError naming the file otherwise."""
    want_np = np.dtype(_NP_DTYPES[store.dtype])
    _check_tokens(store)
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
        _check_positions(store, sh, pos)
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


def _check_tokens(store) -> None:
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
