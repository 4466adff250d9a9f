"""Activation stores in the ecosystem's formats: open any store folder by what its files say, read a
SAELens activation cache as a store, and export a saekit store as one.

A SAELens activation cache is the `datasets` folder that SAELens's `CacheActivationsRunner` writes
(`dataset_info.json`, `state.json`, `data-*.arrow`): one row per context, an `Array2D` column
[context_size, d_in] per hook (named the TransformerLens way, `blocks.15.hook_resid_post`) and an
optional `token_ids` column [context_size]. Reading it: the arrow files are memory-mapped and each
record batch is one shard, so batches come from the same bounded shuffle buffer as a saekit store.
Hook columns are offered under saekit's names (`resid_post.15`) as well as their own. BOS positions
are dropped as saekit drops them: when every context starts with the same token (SAELens's
prepend_bos), that token is the BOS and its positions hold no training row.

Exporting: saekit stores hold no BOS or padding rows, so the export packs the stored rows, in
(sequence, position) order, into SAELens rows of `context_size` consecutive stored tokens (default:
the store's positions per sequence, seq_len - 1 when BOS was dropped); the tail that does not fill a
row is left out and reported. The export also carries saekit's side files (`saekit_manifest.json`,
`saekit_positions.npy`, `tokens.npy`, `doc_ids.npy`), which SAELens ignores and saekit reads back,
so a round trip keeps every row's (sequence, position) and the text for the CE metrics and feature
contexts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..models import saekit_hook_name, saelens_hook_name  # noqa: F401  (re-exported)
from ..plumbing.checks import whole_number
from ..plumbing.files import read_json_object
from .store import FORMAT, ActivationStore, StoreError

SAELENS_FORMAT = "saelens-cache"
FORMATS = {
    FORMAT: "a saekit store (manifest.json, written by `saekit capture`)",
    SAELENS_FORMAT: "a SAELens activation cache (a `datasets` folder with dataset_info.json and "
    "state.json, written "
    "by SAELens's CacheActivationsRunner or `saekit export-store --format saelens`)",
}
_SIDE_MANIFEST = "saekit_manifest.json"
_SIDE_POSITIONS = "saekit_positions.npy"
_ARRAY_DTYPES = {"float16": np.float16, "float32": np.float32}


def store_format(path: str | Path) -> str:
    """Which format the folder holds, from its own files; a clear error naming the formats
    otherwise."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return FORMAT
    if (path / "dataset_info.json").exists() and (path / "state.json").exists():
        return SAELENS_FORMAT
    what = (
        "does not exist"
        if not path.exists()
        else "is not a folder"
        if not path.is_dir()
        else "holds neither format's files (it has: "
        f"{', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})"
    )
    raise StoreError(
        f"{path} {what}. An activation store is one of: "
        + "; ".join(FORMATS.values())
        + ". Make one with `saekit capture`."
    )


def open_store(path: str | Path, hook: str | None = None) -> ActivationStore:
    """Open a store folder in whichever format it is (no flag: its files say which)."""
    return (ActivationStore if store_format(path) == FORMAT else SAELensCache)(path, hook)


class _KeptRows:
    """Rows of a flat [n, d] array at the kept indices, indexable like the array itself."""

    def __init__(self, flat: np.ndarray, idx: np.ndarray):
        self.flat, self.idx = flat, idx
        self.shape, self.dtype = (len(idx), flat.shape[1]), flat.dtype

    def __getitem__(self, key):
        return self.flat[self.idx[key]]


class SAELensCache(ActivationStore):
    """A SAELens activation cache read as an ActivationStore (same batches, rows, positions,
    tokens)."""

    def __init__(self, path: str | Path, hook: str | None = None):
        import datasets

        self.path = Path(path)
        try:
            self.dataset = datasets.load_from_disk(str(self.path))
        except Exception as e:  # datasets raises several types for a damaged folder
            raise StoreError(
                f"{self.path} looks like a SAELens activation cache but "
                f"`datasets` cannot open it ({e}); re-create it (SAELens's "
                "CacheActivationsRunner or `saekit export-store`)"
            ) from e
        if isinstance(self.dataset, datasets.DatasetDict):
            raise StoreError(
                f"{self.path} holds a DatasetDict ({list(self.dataset)}); point --store at one "
                "split's folder"
            )
        feats = self.dataset.features
        self.columns = {
            saekit_hook_name(c): c for c, f in feats.items() if isinstance(f, datasets.Array2D)
        }
        if not self.columns:
            raise StoreError(
                f"{self.path}: no Array2D activation column (columns: {list(feats)}); a "
                "SAELens cache has one per hook, e.g. 'blocks.0.hook_resid_post'"
            )
        shapes = {feats[c].shape for c in self.columns.values()}
        dtypes = {feats[c].dtype for c in self.columns.values()}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise StoreError(
                f"{self.path}: hook columns differ in shape {shapes} or dtype {dtypes}"
            )
        ((self.context_size, d),) = shapes
        (dtype,) = dtypes
        if dtype not in _ARRAY_DTYPES:
            raise StoreError(
                f"{self.path}: activations stored as {dtype}; "
                "saekit reads float16 or float32 caches"
            )
        self.hooks = list(self.columns)
        self.hook = self.hook_name(hook or self.hooks[0])
        self.dtype, self.d_model = dtype, int(d)
        side = self.path / _SIDE_MANIFEST
        fix = "re-export the store with `saekit export-store`"
        self.side = read_json_object(side, StoreError, fix) if side.exists() else None
        self._token_ids = self._read_token_ids()
        self._plan_shards()
        self.manifest = self._make_manifest()
        self._maps = {}

    def hook_name(self, hook: str | None) -> str:
        """The hook to read (None: the cache's), by saekit's or the column's own
        (TransformerLens) name."""
        key = saekit_hook_name(hook or self.hook)
        if key not in self.columns:
            raise StoreError(
                f"hook '{hook}' is not in SAELens cache {self.path}; it holds "
                f"{[f'{k} ({c})' if k != c else k for k, c in self.columns.items()]}"
            )
        return key

    def _read_token_ids(self) -> np.ndarray | None:
        if "token_ids" not in self.dataset.column_names:
            return None
        col = self.dataset.data.table.column("token_ids").combine_chunks()
        return col.flatten().to_numpy().reshape(-1, self.context_size).astype(np.int32)

    def _plan_shards(self) -> None:
        """One shard per arrow record batch; the kept flat indices and (sequence, position) of
        each."""
        n_seq = len(self.dataset)
        if self.side is not None:
            pos = np.load(self.path / _SIDE_POSITIONS, mmap_mode="r")
            if pos.shape != (n_seq * self.context_size, 2):
                raise StoreError(
                    f"{self.path}: {_SIDE_POSITIONS} has shape {pos.shape}, the cache holds "
                    f"{n_seq} x {self.context_size} rows; re-export the store"
                )
            limits = (self.side.get("n_sequences"), self.side.get("seq_len"))
            if pos.size and (
                int(pos.min()) < 0
                or not all(whole_number(n) for n in limits)
                or int(pos[:, 0].max()) >= limits[0]
                or int(pos[:, 1].max()) >= limits[1]
            ):
                raise StoreError(
                    f"{self.path}: {_SIDE_POSITIONS} holds positions outside the "
                    f"{limits[0]} x {limits[1]} token grid of {_SIDE_MANIFEST}, or it lacks "
                    "that grid; re-export the store"
                )
            keep = np.ones((n_seq, self.context_size), dtype=bool)
            self.bos_token_id = self.side.get("bos_token_id")
        else:
            toks = self._token_ids
            first = None if toks is None or n_seq < 2 else np.unique(toks[:, 0])
            self.bos_token_id = int(first[0]) if first is not None and len(first) == 1 else None
            keep = (
                np.ones((n_seq, self.context_size), dtype=bool)
                if self.bos_token_id is None
                else toks != self.bos_token_id
            )
            seq, p = np.nonzero(keep)
            pos = np.stack([seq, p], 1).astype(np.int32)
        chunks = self.dataset.data.table.column(self.columns[self.hook]).chunks
        self.shards, self._keep_flat, self._pos, start = [], [], pos, 0
        for i, ch in enumerate(chunks):
            n = len(ch)
            kflat = np.flatnonzero(keep[start : start + n].ravel())
            self.shards.append(
                {"index": i, "seq_start": start, "seq_end": start + n, "n_rows": int(len(kflat))}
            )
            self._keep_flat.append(None if len(kflat) == n * self.context_size else kflat)
            start += n

    def _make_manifest(self) -> dict:
        runner = self.path / "cache_activations_runner_cfg.json"
        rcfg = json.loads(runner.read_text()) if runner.exists() else {}
        base = dict(self.side or {})
        n_rows = sum(s["n_rows"] for s in self.shards)
        return {
            **base,
            "format": SAELENS_FORMAT,
            "hooks": self.hooks,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "model": base.get("model") or rcfg.get("model_name"),
            "seq_len": base.get("seq_len", self.context_size),
            "n_sequences": base.get("n_sequences", len(self.dataset)),
            "drop_bos": base.get("drop_bos", self.bos_token_id is not None),
            "bos_token_id": self.bos_token_id,
            "pad_token_id": base.get("pad_token_id"),
            "corpus": base.get(
                "corpus", {"corpus": rcfg.get("dataset_path"), "source": str(self.path)}
            ),
            "context_size": self.context_size,
            "shards": self.shards,
            "n_rows": n_rows,
            "complete": True,
        }

    def _open(self, shard: dict, what: str):
        key = (shard["index"], what)
        if key not in self._maps:
            i = shard["index"]
            if what == "pos":
                before = sum(s["n_rows"] for s in self.shards[:i])
                self._maps[key] = np.asarray(self._pos[before : before + shard["n_rows"]])
            else:
                ch = self.dataset.data.table.column(self.columns[what]).chunks[i]
                flat = (
                    ch.storage.flatten()
                    .flatten()
                    .to_numpy(zero_copy_only=True)
                    .reshape(-1, self.d_model)
                )
                kflat = self._keep_flat[i]
                self._maps[key] = flat if kflat is None else _KeptRows(flat, kflat)
        return self._maps[key]

    def _validate(self) -> None:  # the arrow schema was checked on open; shapes follow from it
        pass

    @property
    def tokens(self) -> np.ndarray:
        if self.side is not None:
            return np.load(self.path / "tokens.npy", mmap_mode="r")
        if self._token_ids is None:
            raise StoreError(
                f"SAELens cache {self.path} has no token_ids column, so there is no "
                "text for CE metrics or feature contexts (pass --no-ce); cache "
                "with a SAELens version that stores token_ids"
            )
        return self._token_ids

    @property
    def doc_ids(self) -> np.ndarray:
        if self.side is not None:
            return np.load(self.path / "doc_ids.npy", mmap_mode="r")
        keep = self.keep_mask()
        return np.where(keep, np.arange(keep.shape[0])[:, None], -1).astype(np.int32)


class _quiet_datasets:
    """Silence datasets' own progress bars while we show ours."""

    def __enter__(self):
        import datasets

        self.was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import datasets

        if self.was:
            datasets.utils.logging.enable_progress_bar()
