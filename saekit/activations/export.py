"""Writing a store in another format: `export_store` (today SAELens's activation cache)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import saekit_hook_name, saelens_hook_name  # noqa: F401  (re-exported)
from ..plumbing.files import (
    atomic_save_npy,
    atomic_write_json,
    prepare_output,
    refuse_overlap,
    require_space,
)
from ..plumbing.locks import writer_lock
from .formats import (
    _ARRAY_DTYPES,
    _SIDE_MANIFEST,
    _SIDE_POSITIONS,
    _quiet_datasets,
    open_store,
)
from .store import ActivationStore, StoreError


def export_store(
    store: ActivationStore | str | Path,
    out: str | Path,
    format: str = "saelens",
    context_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `store` as a SAELens activation cache at `out` (atomically: a killed export leaves no
    `out`).

    context_size: stored tokens per SAELens row (None: the store's kept positions per full
    sequence). Returns `out`. The export holds OUT's writer lock (saekit.plumbing.locks) from
    start to end."""
    if format != "saelens":
        raise StoreError(f"unknown export format '{format}'; the one there is: saelens")
    store = open_store(store) if isinstance(store, (str, Path)) else store
    out = Path(out)
    refuse_overlap(out, {"store": store.path}, "export folder")
    prepare_output(out.parent, 0, "folder of the export")
    # OUT is replaced whole at the end, so its writer lock lives beside it; a folder already there
    # (a store being captured, say) is locked as well
    with writer_lock(out, "export-store", beside=True), contextlib.ExitStack() as held:
        if out.is_dir():
            held.enter_context(writer_lock(out, "export-store"))
        return _export_saelens(store, out, context_size, overwrite, progress)


def _export_saelens(
    store: ActivationStore, out: Path, context_size: int | None, overwrite: bool, progress: bool
) -> Path:
    if out.exists() and not overwrite:
        raise StoreError(f"{out} exists; choose another folder or pass --overwrite")
    context_size, n_ctx, pos = _contexts(store, context_size)
    dtype = "float16" if store.dtype == "float16" else "float32"
    columns = {saelens_hook_name(h): h for h in store.hooks}
    row_bytes = context_size * store.d_model * _ARRAY_DTYPES[dtype]().itemsize * len(columns)
    # (twice the cache: its pieces and their concatenation)
    require_space(out.parent, 2 * n_ctx * (row_bytes + 4 * context_size))
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    final = tmp / "cache"
    _write_cache(store, final, columns, dtype, context_size, n_ctx, pos, progress)
    _write_side_files(store, final, columns, context_size, n_ctx, pos)
    if out.exists():
        shutil.rmtree(out)
    os.replace(final, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _contexts(store: ActivationStore, context_size: int | None) -> tuple[int, int, np.ndarray]:
    """(rows per context, whole contexts the store fills, every row's (sequence, position)),
    checked: at least one context, rows in (sequence, position) order."""
    m = store.manifest
    if context_size is None:
        context_size = int(
            m.get("context_size") or m["seq_len"] - (1 if m.get("drop_bos", True) else 0)
        )
    n_ctx = len(store) // context_size
    if n_ctx == 0:
        raise StoreError(
            f"store {store.path} holds {len(store)} rows, fewer than one context of {context_size}"
        )
    pos = store.positions()
    key = pos[:, 0].astype(np.int64) * (int(pos[:, 1].max()) + 1) + pos[:, 1]
    if np.any(np.diff(key) <= 0):
        raise StoreError(
            f"store {store.path} is not in (sequence, position) "
            "order; it cannot be exported as contexts"
        )
    return context_size, n_ctx, pos


def _write_cache(store, final: Path, columns, dtype, context_size, n_ctx, pos, progress) -> None:
    """The `datasets` folder at `final`: pieces of about 64 MB written one by one, then joined."""
    import datasets

    features = datasets.Features(
        {
            **{
                c: datasets.Array2D(shape=(context_size, store.d_model), dtype=dtype)
                for c in columns
            },
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=context_size),
        }
    )
    toks = np.asarray(store.tokens)
    row_bytes = context_size * store.d_model * _ARRAY_DTYPES[dtype]().itemsize * len(columns)
    rows_per_piece = max(1, (64 << 20) // row_bytes)
    pieces = []
    with _quiet_datasets():
        starts = range(0, n_ctx, rows_per_piece)
        for i, s in enumerate(
            tqdm(starts, desc="export saelens", unit="piece", disable=not progress)
        ):
            e = min(s + rows_per_piece, n_ctx)
            r0, r1 = s * context_size, e * context_size
            # float16 is written as it is stored; bfloat16 (numpy has none) and
            # float32 go out as float32
            piece = {
                c: store.rows(r0, r1, h)
                .to(torch.float16 if dtype == "float16" else torch.float32)
                .numpy()
                .reshape(e - s, context_size, -1)
                for c, h in columns.items()
            }
            piece["token_ids"] = (
                toks[pos[r0:r1, 0], pos[r0:r1, 1]].reshape(e - s, context_size).astype(np.int32)
            )
            path = final.parent / "pieces" / f"{i:05d}"
            datasets.Dataset.from_dict(piece, features=features).save_to_disk(str(path))
            pieces.append(path)
        whole = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in pieces])
        whole.save_to_disk(str(final))


# the manifest fields a SAELens export carries, so saekit reads it back as the store it was
SIDE_KEYS = (
    "model",
    "seq_len",
    "n_sequences",
    "drop_bos",
    "bos_token_id",
    "pad_token_id",
    "corpus",
    "tokens_sha256",
)


def _write_side_files(store, final: Path, columns, context_size, n_ctx, pos) -> None:
    """saekit's files beside the cache, which SAELens ignores: every row's position, the tokens,
    the document ids and the store's manifest fields."""
    atomic_save_npy(final / _SIDE_POSITIONS, pos[: n_ctx * context_size].astype(np.int32))
    atomic_save_npy(final / "tokens.npy", np.asarray(store.tokens))
    atomic_save_npy(final / "doc_ids.npy", np.asarray(store.doc_ids))
    atomic_write_json(
        final / _SIDE_MANIFEST,
        {
            **{k: store.manifest.get(k) for k in SIDE_KEYS},
            "exported_from": str(store.path),
            "saekit_hooks": columns,
            "context_size": context_size,
            "rows_left_out": len(store) - n_ctx * context_size,
        },
    )
