"""The activation store: a captured folder, validated on open, read memory-mapped, served as
shuffled batches.

Store layout (DIR):
    manifest.json            what was captured and which shards are complete (rewritten atomically)
    tokens.npy, doc_ids.npy  the packed token ids [n_seq, seq_len] and their document index
    shards/NNNNN.pos.npy     [rows, 2] int32 (sequence, position) of every stored activation row
    shards/NNNNN.HOOK.npy    [rows, d_model] activations (bf16 is stored as uint16 bits)
A shard covers a fixed range of sequences, so an interrupted capture resumes at the first missing
shard with no token lost or duplicated.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..plumbing.checks import require_finite
from .integrity import check_files
from .manifest import (  # noqa: F401  (re-exported: the store's names)
    _NP_DTYPES,
    DTYPES,
    FORMAT,
    MANIFEST_KEYS,
    SHARD_KEYS,
    StoreError,
    hook_file,
    read_manifest,
)


@dataclass
class _Chunk:
    shard: int
    start: int
    end: int


class ActivationStore:
    """A captured store: validated on open, read memory-mapped, served as shuffled batches."""

    # the last pass's shuffle buffer (see _take_buffer)
    _spare: tuple[np.ndarray, np.ndarray] | None = None

    def __init__(self, path: str | Path, hook: str | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.hooks: list[str] = list(self.manifest["hooks"])
        self.hook = self.hook_name(hook or self.hooks[0])
        self.dtype: str = self.manifest["dtype"]
        self.d_model: int = int(self.manifest["d_model"] or 0)
        self.shards: list[dict] = list(self.manifest["shards"])
        if not self.shards:
            raise StoreError(
                f"store {self.path} is empty: its capture wrote no shard yet (resume it with the "
                "same command)"
            )
        if not self.manifest.get("complete"):
            warnings.warn(
                f"store {self.path} is incomplete ({len(self.shards)} shards); reading "
                "what is there. Re-run the same capture to finish it.",
                stacklevel=2,
            )
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._validate()

    # -- validation --------------------------------------------------------------------------
    def _open(self, shard: dict, what: str) -> np.ndarray:
        key = (shard["index"], what)
        if key not in self._maps:
            f = self.path / "shards" / f"{shard['index']:05d}.{hook_file(what)}.npy"
            if not f.exists():
                raise StoreError(
                    f"store {self.path}: shard file {f.name} is missing; the manifest lists shard "
                    f"{shard['index']}. Restore it or re-capture into a new folder."
                )
            try:
                self._maps[key] = np.load(f, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise StoreError(
                    f"store {self.path}: shard file {f.name} is truncated or corrupt ({e}). "
                    f"Delete the folder and capture again."
                ) from e
        return self._maps[key]

    def _validate(self) -> None:
        self._checked = check_files(self)

    def record_checked(self) -> None:
        """Record the files whose values this open checked, so that later opens read only their
        headers while they stay unchanged (capture calls it once the store is complete)."""
        self._checked.save()

    def _row_starts(self) -> np.ndarray:
        """The store row each shard starts at, and the total last: [n_shards + 1]."""
        return np.cumsum([0] + [sh["n_rows"] for sh in self.shards])

    def locate(self, row: int) -> tuple[int, int]:
        """(shard index, row within that shard) of store row `row`."""
        starts = self._row_starts()
        i = int(np.searchsorted(starts, row, side="right") - 1)
        return int(self.shards[i]["index"]), int(row - starts[i])

    # -- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def tokens(self) -> np.ndarray:
        """[n_seq, seq_len] token ids, memory-mapped."""
        return np.load(self.path / "tokens.npy", mmap_mode="r")

    @property
    def doc_ids(self) -> np.ndarray:
        return np.load(self.path / "doc_ids.npy", mmap_mode="r")

    def hook_name(self, hook: str | None) -> str:
        """The hook to read (None: the store's), checked against the hooks the store holds."""
        hook = hook or self.hook
        if hook not in self.hooks:
            raise StoreError(f"hook '{hook}' is not in store {self.path}; it holds {self.hooks}")
        return hook

    def source_model(self) -> str:
        """The model these activations came from, or a clear error where the store does not say."""
        if not self.manifest.get("model"):
            raise StoreError(
                f"store {self.path} does not say which model it "
                "came from; pass --model (or --no-ce)"
            )
        return self.manifest["model"]

    def positions(self) -> np.ndarray:
        """[n_rows, 2] (sequence, position) of every row in store order."""
        return np.concatenate([np.asarray(self._open(sh, "pos")) for sh in self.shards])

    def keep_mask(self) -> np.ndarray:
        """[n_seq, seq_len] bool: which (sequence, position) of `tokens` has a stored activation
        row."""
        pos = self.positions()
        keep = np.zeros(self.tokens.shape, dtype=bool)
        keep[pos[:, 0], pos[:, 1]] = True
        return keep

    def _to_torch(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(arr, copy=True))
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def rows(self, start: int, end: int, hook: str | None = None) -> torch.Tensor:
        """Rows [start, end) in store order, as stored dtype."""
        hook = self.hook_name(hook)
        out, offset = [], 0
        for sh in self.shards:
            n = sh["n_rows"]
            s, e = max(start - offset, 0), min(end - offset, n)
            if s < e:
                out.append(self._to_torch(self._open(sh, hook)[s:e]))
            offset += n
        return torch.cat(out) if out else torch.empty(0, self.d_model, dtype=DTYPES[self.dtype])

    def take(self, rows: np.ndarray, hook: str | None = None) -> torch.Tensor:
        """Rows at the given increasing store-order indices, as stored dtype."""
        hook = self.hook_name(hook)
        rows = np.asarray(rows, dtype=np.int64)
        starts = self._row_starts()
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        out = [
            self._to_torch(self._open(self.shards[i], hook)[rows[shard_of == i] - starts[i]])
            for i in np.unique(shard_of)
        ]
        return torch.cat(out) if out else torch.empty(0, self.d_model, dtype=DTYPES[self.dtype])

    def head_batches(
        self, n: int, batch_size: int, hook: str | None = None
    ) -> Iterator[torch.Tensor]:
        """The first n rows in store order as float32 batches, each checked finite (a NaN/inf row is
        an error naming its shard and row)."""
        for s in range(0, n, batch_size):
            x = self.rows(s, min(s + batch_size, n), hook).float()
            require_finite(x, self, s)
            yield x

    def load(self, hook: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole store for one hook in memory [n_rows, d_model] (the in-memory mode for small
        runs)."""
        return self.rows(0, len(self), hook).to(dtype)

    def batches(
        self,
        batch_size: int,
        hook: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int = 1,
        buffer_rows: int = 131_072,
        chunk_rows: int = 1024,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        return_positions: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator:
        """Shuffled batches [batch_size, d_model] covering every row once per epoch with bounded
        RAM.

        The store is cut into chunks of `chunk_rows` contiguous rows; the chunks are taken in a
        random order across all shards, `buffer_rows` worth of them read (contiguous reads, one
        copy) into a buffer, and batches are gathered from the buffer in a random order of its rows,
        converted to `dtype` a batch at a time. A batch thus mixes rows of buffer_rows / chunk_rows
        places spread over the whole store. Memory: one buffer of stored-dtype rows. With world_size
        > 1 each rank reads its own chunks. return_positions adds the [B, 2] (sequence, position) of
        each row. Once a buffer is read, the kernel is asked to read the next buffer's chunks from
        disk in the background (`_advise`): no thread of ours, so the step keeps the cores.
        """
        hook = self.hook_name(hook)
        chunks = self._chunks(chunk_rows)
        per_buffer = max(1, buffer_rows // chunk_rows)
        # one buffer for the whole run, refilled in place: a fresh one per fill costs its page
        # faults every time
        room = min(per_buffer * chunk_rows, len(self)) + batch_size
        out = self._take_buffer(room)
        try:
            for epoch in range(epochs):
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                mine = _in_order(chunks, g, shuffle)[rank::world_size]
                carry_x, carry_p = None, None
                for b in range(0, len(mine), per_buffer):
                    x, p = self._read_chunks(mine[b : b + per_buffer], hook, carry_x, carry_p, out)
                    self._advise(mine[b + per_buffer : b + 2 * per_buffer], hook)
                    idx = (
                        torch.randperm(x.shape[0], generator=g)
                        if shuffle
                        else torch.arange(x.shape[0])
                    )
                    n_full = (x.shape[0] // batch_size) * batch_size
                    for i in range(0, n_full, batch_size):
                        sel = idx[i : i + batch_size]
                        yield self._emit(x[sel], p[sel], dtype, device, return_positions)
                    carry_x, carry_p = x[idx[n_full:]], p[idx[n_full:]]
                if carry_x is not None and carry_x.shape[0] and not drop_last:
                    yield self._emit(carry_x, carry_p, dtype, device, return_positions)
        # the next pass over this store (a trainer's init sample, training, calibration) refills it
        finally:
            self._spare = out

    def _chunks(self, chunk_rows: int) -> list[_Chunk]:
        """The store cut into chunks of at most chunk_rows contiguous rows of one shard."""
        return [
            _Chunk(i, s, min(s + chunk_rows, sh["n_rows"]))
            for i, sh in enumerate(self.shards)
            for s in range(0, sh["n_rows"], chunk_rows)
        ]

    def _take_buffer(self, room: int) -> tuple[np.ndarray, np.ndarray]:
        """A buffer of at least `room` rows (activations and positions): the one the previous pass
        left, its pages already in place (a fresh buffer's first fill is mostly page faults), else a
        new one. Taken, not shared: two passes at once each have their own."""
        spare, self._spare = self._spare, None
        if spare is not None and spare[0].shape[0] >= room:
            return spare
        return np.empty((room, self.d_model), dtype=_NP_DTYPES[self.dtype]), np.empty(
            (room, 2), dtype=np.int32
        )

    def _advise(self, group: list, hook: str) -> None:
        """posix_fadvise(WILLNEED) over the chunks' bytes in the activation and position files: the
        kernel starts reading them from disk now, while the step computes, and the buffer copy later
        finds them in memory. (Where the OS has no fadvise, nothing happens.)"""
        if not group or not hasattr(os, "posix_fadvise"):
            return
        for what in (hook, "pos"):
            for c in group:
                arr = self._open(self.shards[c.shard], what)
                # a reader of another format (SAELensCache's rows)
                if not isinstance(arr, np.memmap):
                    return
                row = arr.strides[0]
                fd = os.open(arr.filename, os.O_RDONLY)
                try:
                    os.posix_fadvise(
                        fd,
                        arr.offset + c.start * row,
                        (c.end - c.start) * row,
                        os.POSIX_FADV_WILLNEED,
                    )
                finally:
                    os.close(fd)

    def _read_chunks(
        self, group: list, hook: str, carry_x, carry_p, out
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunks' rows (after the carried-over ones) at the front of `out`'s activation and
        position arrays, which hold a group and a carry (fewer than a batch) by construction; the
        carried rows are copies, never views of `out`."""
        n_carry = 0 if carry_x is None else carry_x.shape[0]
        n = n_carry + sum(c.end - c.start for c in group)
        x, p = out[0][:n], out[1][:n]
        if n_carry:
            x[:n_carry] = (
                carry_x.view(torch.int16) if self.dtype == "bfloat16" else carry_x
            ).numpy()
            p[:n_carry] = carry_p.numpy()
        o = n_carry
        for c in group:
            m = c.end - c.start
            x[o : o + m] = self._open(self.shards[c.shard], hook)[c.start : c.end]
            p[o : o + m] = self._open(self.shards[c.shard], "pos")[c.start : c.end]
            o += m
        xt = torch.from_numpy(x)
        return (xt.view(torch.bfloat16) if self.dtype == "bfloat16" else xt), torch.from_numpy(p)

    @staticmethod
    def _emit(x, p, dtype, device, return_positions):
        x = x.to(dtype)
        if device is not None:
            x = x.to(device, non_blocking=True)
        return (x, p) if return_positions else x

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"{type(self).__name__}({str(self.path)!r}, model={m['model']!r}, hooks={self.hooks}, "
            f"rows={len(self):,}, "
            f"d_model={self.d_model}, dtype={self.dtype}, complete={m.get('complete')})"
        )


def _in_order(chunks: list, g: torch.Generator, shuffle: bool) -> list:
    """The chunks in a random order drawn from g (shuffle), else as they lie."""
    return (
        [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
        if shuffle
        else chunks
    )
