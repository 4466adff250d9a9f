"""The layout of a sparse code that every sparse kernel shares: `CodeIndex` (its entries grouped by
row, and by latent when first needed) and `SparseCode` (the entries and their values)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_ARANGES: dict = {}


def arange(n: int, device: torch.device) -> torch.Tensor:
    """torch.arange(n) on `device`, made once per (n, device) and shared (never written to): a
    kernel launch less each time a step needs one. Not kept while a CUDA graph is being recorded
    (its kernels have not run yet)."""
    key = (n, device)
    got = _ARANGES.get(key)
    if got is None:
        got = torch.arange(n, device=device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            # a handful of sizes in practice (batch, d_sae): bounded all the same
            if len(_ARANGES) >= 64:
                _ARANGES.clear()
            _ARANGES[key] = got
    return got


def stable_argsort(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """torch.argsort(keys, stable=True) for integer keys in [0, bound), sorted as int32 where they
    fit: the CPU's int64 stable sort of keys with repeats is far slower, and a GPU's radix sort
    has half the bits to do."""
    return torch.argsort(keys.to(torch.int32) if bound < 2**31 else keys, stable=True)


class CodeIndex:
    """The layout of a sparse code's entries (rows, cols) that the sparse kernels share: the entries
    grouped by row (row offsets; a permutation only where the entries were not in row-major order
    already) and, made once when first needed, grouped by latent (a stable order and latent
    offsets). One code's forward decode, its encoder and decoder gradients all read the same index,
    so a training step sorts its entries at most twice (once by row where needed, once by latent)
    instead of once per product."""

    def __init__(
        self,
        rows: torch.Tensor,
        cols: torch.Tensor,
        n_rows: int,
        n_cols: int,
        rows_sorted: bool = False,
    ):
        self.n_rows, self.n_cols = n_rows, n_cols
        self.perm = None if rows_sorted else stable_argsort(rows, n_rows)
        self.rows = rows if rows_sorted else rows[self.perm]
        self.cols = cols if rows_sorted else cols[self.perm]
        # each row's first entry and, one past the last row, the count: the row offsets (a
        # view) and l0 per row
        self.row_bounds = torch.searchsorted(self.rows, arange(n_rows + 1, rows.device))
        self.row_offsets = self.row_bounds[:-1]
        self._by_col = None
        # AuxK's dead-column gradients, left by auxk.DeadColumns for the backward to add
        self.aux_grads = None

    def row_counts(self) -> torch.Tensor:
        """Entries per row (l0 per token where every entry is active)."""
        return self.row_bounds.diff()

    def by_row(self, v: torch.Tensor) -> torch.Tensor:
        """Per-entry values in the index's row order."""
        return v if self.perm is None else v[self.perm]

    def from_row(self, v: torch.Tensor) -> torch.Tensor:
        """Per-entry values in row order back in the entries' own order."""
        if self.perm is None:
            return v
        out = torch.empty_like(v)
        out[self.perm] = v
        return out

    def by_col(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order: row-order positions sorted by latent, the entries' rows in that order, latent
        offsets)."""
        if self._by_col is None:
            order = stable_argsort(self.cols, self.n_cols)
            offsets = torch.searchsorted(self.cols[order], arange(self.n_cols, self.cols.device))
            self._by_col = (order, self.rows[order], offsets)
        return self._by_col

    def row_sum(self, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """out[r] = sum over entries e of row r of w[e] * table[cols[e]]: [n_rows, table width]."""
        return F.embedding_bag(
            self.cols,
            table,
            self.row_offsets,
            mode="sum",
            per_sample_weights=self.by_row(w).to(table.dtype),
        )

    def col_sum(self, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """out[c] = sum over entries e of latent c of w[e] * table[rows[e]]: [n_cols, table
        width]."""
        order, rows, offsets = self.by_col()
        return F.embedding_bag(
            rows,
            table,
            offsets,
            mode="sum",
            per_sample_weights=self.by_row(w)[order].to(table.dtype),
        )


class SparseCode(NamedTuple):
    """Active entries of a code: rows (token), cols (latent), vals; `shape` = (batch, d_sae).
    `index`: their CodeIndex where one is shared with the code's encoder (None: sparse_decode
    makes one)."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, int]
    index: CodeIndex | None = None

    def dense(self) -> torch.Tensor:
        z = self.vals.new_zeros(self.shape)
        z[self.rows, self.cols] = self.vals
        return z
