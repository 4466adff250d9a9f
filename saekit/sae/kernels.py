"""The numerical pieces the SAEs are built from: selections and sparse codes, the sparse encoder's autograd,
embedding_bag row sums, exact top-k over a whole batch, and JumpReLU's straight-through step functions."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Selection(NamedTuple):
    """What an architecture's `select` keeps of pre-activations a [batch, d_sae]: the active entries'
    rows (token) and cols (latent), in row-major order (rows non-decreasing: every selection is made so, and the
    sparse kernels group a code's entries by row without sorting them), and, where it cuts by value over the
    batch (BatchTopK in training), `cut`: the smallest kept value (a 0-dim tensor; None otherwise). BatchTopK's
    theta is the mean cut."""
    rows: torch.Tensor
    cols: torch.Tensor
    cut: torch.Tensor | None = None
    exact: torch.Tensor | None = None  # a 0-dim bool tensor where the selection may not be exact (see batch_topk_static)


_ARANGES: dict = {}


def arange(n: int, device: torch.device) -> torch.Tensor:
    """torch.arange(n) on `device`, made once per (n, device) and shared (never written to): a kernel launch less
    each time a step needs one. Not kept while a CUDA graph is being recorded (its kernels have not run yet)."""
    key = (n, device)
    got = _ARANGES.get(key)
    if got is None:
        got = torch.arange(n, device=device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            if len(_ARANGES) >= 64:  # a handful of sizes in practice (batch, d_sae): bounded all the same
                _ARANGES.clear()
            _ARANGES[key] = got
    return got


def stable_argsort(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """torch.argsort(keys, stable=True) for integer keys in [0, bound), sorted as int32 where they fit: on CPU
    the int64 stable sort of keys with repeats measured ~25x slower (12 ms vs 0.5 ms for 32,768 latent indices of
    4,608), and a GPU's radix sort has half the bits to do."""
    return torch.argsort(keys.to(torch.int32) if bound < 2**31 else keys, stable=True)


class CodeIndex:
    """The layout of a sparse code's entries (rows, cols) that the sparse kernels share: the entries grouped by
    row (row offsets; a permutation only where the entries were not in row-major order already) and, made once
    when first needed, grouped by latent (a stable order and latent offsets). One code's forward decode, its
    encoder and decoder gradients all read the same index, so a training step sorts its entries at most twice
    (once by row where needed, once by latent) instead of once per product."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, rows_sorted: bool = False):
        self.n_rows, self.n_cols = n_rows, n_cols
        self.perm = None if rows_sorted else stable_argsort(rows, n_rows)
        self.rows = rows if rows_sorted else rows[self.perm]
        self.cols = cols if rows_sorted else cols[self.perm]
        # each row's first entry and, one past the last row, the count: the row offsets (a view) and l0 per row
        self.row_bounds = torch.searchsorted(self.rows, arange(n_rows + 1, rows.device))
        self.row_offsets = self.row_bounds[:-1]
        self._by_col = None
        self.aux_grads = None  # AuxK's dead-column gradients, left by auxk.DeadColumns for the backward to add

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
        """(order: row-order positions sorted by latent, the entries' rows in that order, latent offsets)."""
        if self._by_col is None:
            order = stable_argsort(self.cols, self.n_cols)
            offsets = torch.searchsorted(self.cols[order], arange(self.n_cols, self.cols.device))
            self._by_col = (order, self.rows[order], offsets)
        return self._by_col

    def row_sum(self, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """out[r] = sum over entries e of row r of w[e] * table[cols[e]]: [n_rows, table width]."""
        return F.embedding_bag(self.cols, table, self.row_offsets, mode="sum",
                               per_sample_weights=self.by_row(w).to(table.dtype))

    def col_sum(self, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """out[c] = sum over entries e of latent c of w[e] * table[rows[e]]: [n_cols, table width]."""
        order, rows, offsets = self.by_col()
        return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=self.by_row(w)[order].to(table.dtype))


class SparseCode(NamedTuple):
    """Active entries of a code: rows (token), cols (latent), vals; `shape` = (batch, d_sae). `index`: their
    CodeIndex where one is shared with the code's encoder (None: sparse_decode makes one)."""
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, int]
    index: CodeIndex | None = None

    def dense(self) -> torch.Tensor:
        z = self.vals.new_zeros(self.shape)
        z[self.rows, self.cols] = self.vals
        return z


def rectangle(a: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The rectangle kernel's window, |a - theta| < bandwidth / 2 (theta per latent, broadcast over rows), as a bool
    mask: two compares against the window's bounds, no float temporaries of a's size. On 2 CPU cores at
    1,024 x 4,608, the window's entries took 4.7 ms this way and 27.3 ms as the kernel of (a - theta) / bandwidth
    (a subtraction, a division, two compares and a float copy)."""
    half = bandwidth / 2
    return (a > theta - half) & (a < theta + half)


class JumpReLUFunction(torch.autograd.Function):
    """z = a * H(a - theta); gradient to theta through a rectangle kernel of width `bandwidth`."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return a * (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_a = g * (a > theta).to(a.dtype)
        grad_theta = (-(theta / bw) * rectangle(a, theta, bw).to(g.dtype) * g).sum(0)
        return grad_a, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(a - theta), with the pseudo-derivative to theta only (the JumpReLU paper's L0 estimator)."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = (-(1.0 / bw) * rectangle(a, theta, bw).to(g.dtype) * g).sum(0)
        return torch.zeros_like(a), grad_theta, None


class SparseEncode(torch.autograd.Function):
    """The selected entries `vals` = relu((x - b_dec) W_enc + b_enc)[rows, cols] of a dense encode that ran
    without autograd, differentiated through those entries only (rows, cols: the entries of `index`).

    Backward touches only the selected entries (sums of selected rows through embedding_bag) instead of two
    dense [batch, d_sae] x [d_sae, d_in] products. Gradients equal the dense path's exactly in math.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, index: CodeIndex, rows, cols, a, xc):
        ctx.save_for_backward(x - b_dec if xc is None else xc.detach(), W_enc, cols)
        ctx.index = index
        return a[rows, cols]  # the gather is the output: no copy of it

    @staticmethod
    def backward(ctx, g):
        xc, W_enc, cols = ctx.saved_tensors
        index = ctx.index
        g = g.to(W_enc.dtype)  # under bf16 autocast the values come out in bf16; gradients stay fp32
        # the selected values are positive (relu passes them), so d vals / d a = 1. The products are sums of
        # selected rows, done as embedding_bag (10x faster than sparse COO matmuls on CPU):
        # grad_W_enc[:, c] = sum_r g[r,c] xc[r];  grad_xc[r] = sum_c g[r,c] W_enc[:, c]
        grad_W_enc = index.col_sum(g, xc.to(W_enc.dtype)).t()  # [d_in, d_sae], latent-major
        if grad_W_enc.stride() != W_enc.stride():  # a gradient in another layout than its parameter is copied
            grad_W_enc = torch.empty_like(W_enc).copy_(grad_W_enc)  # by autograd and again by fused Adam
        grad_b_enc = torch.zeros(index.n_cols, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        # b_dec's gradient is -sum_r grad_xc[r] = -W_enc (sum_r g[r, :]) = -W_enc grad_b_enc: one product with
        # a vector; grad_xc itself (an embedding_bag over every entry and a transposed copy of W_enc) only when
        # the input needs a gradient (training data does not)
        grad_xc = index.row_sum(g, W_enc.t().contiguous()).to(xc.dtype) if ctx.needs_input_grad[0] else None
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[3] else None
        if index.aux_grads is not None:  # AuxK's dead columns (auxk.DeadColumns; b_dec's comes through xc)
            slots, g_enc, g_b_enc, _ = index.aux_grads
            grad_W_enc.t().index_add_(0, slots, g_enc.to(grad_W_enc.dtype))
            grad_b_enc.index_add_(0, slots, g_b_enc.to(grad_b_enc.dtype))
        return grad_xc, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None, None, None


def sparse_encode(x, W_enc, b_enc, b_dec, index: CodeIndex, a: torch.Tensor, xc: torch.Tensor | None = None
                  ) -> SparseCode:
    """The code of `index`'s entries, their values taken from pre-activations a (computed without autograd) and
    differentiable to the encoder's parameters through SparseEncode. xc: x - b_dec where the caller has it
    (SAE.centred_pre_acts), else computed here."""
    rows, cols = index.rows, index.cols
    if index.perm is not None:  # the entries' own order (the code's), not the index's row order
        rows, cols = index.from_row(rows), index.from_row(cols)
    vals = SparseEncode.apply(x, W_enc, b_enc, b_dec, index, rows, cols, a, xc)
    return SparseCode(rows, cols, vals, (index.n_rows, index.n_cols), index)


class SparseDecode(torch.autograd.Function):
    """z W_dec for a sparse z (`vals` at `index`'s entries) as one embedding_bag over row groups; backward gives
    the values' gradients (embedding_bag's own per-sample-weight kernel) and W_dec's as sums of the output
    gradient's rows grouped by latent through the same index (no [B, d_sae] matrix, no sort of its own)."""

    @staticmethod
    def forward(ctx, vals, W_dec, index: CodeIndex):
        w = index.by_row(vals).to(W_dec.dtype)
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(W_dec, index.cols, index.row_offsets, False, 0, False, w)
        ctx.save_for_backward(vals, W_dec, offset2bag)
        ctx.index = index
        return out

    @staticmethod
    def backward(ctx, g):
        vals, W_dec, offset2bag = ctx.saved_tensors
        index = ctx.index
        g = g.contiguous().to(W_dec.dtype)
        grad_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g, W_dec, index.cols, index.row_offsets, offset2bag, 0)
        grad_W_dec = index.col_sum(vals, g)
        if index.aux_grads is not None:  # AuxK's dead rows of W_dec (auxk.DeadColumns)
            slots, _, _, g_dec = index.aux_grads
            grad_W_dec.index_add_(0, slots, g_dec.to(grad_W_dec.dtype))
        return index.from_row(grad_vals).to(vals.dtype), grad_W_dec, None


def sparse_stats(rows: torch.Tensor, cols: torch.Tensor, batch: int, d_sae: int, on: torch.Tensor | None = None,
                 index: CodeIndex | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse path's (fired [d_sae] bool, l0 [batch]) from its active entries (where `on`, if given; else all,
    and `index`, their CodeIndex, counts each row's)."""
    if on is not None:  # counts of the active entries: the others add 0
        on = on.long()
        fired = torch.zeros(d_sae, dtype=torch.long, device=rows.device).index_add_(0, cols, on) > 0
        return fired, torch.zeros(batch, dtype=torch.long, device=rows.device).index_add_(0, rows, on)
    # index_fill_, not fired[cols] = True: on a GPU the assignment copies its True from the host and waits
    fired = torch.zeros(d_sae, dtype=torch.bool, device=rows.device).index_fill_(0, cols, True)
    if index is not None:
        return fired, index.row_counts()
    # a count by index_add: bincount reads the largest index back from the device first
    return fired, torch.zeros(batch, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """z W_dec for a sparse z without building it: embedding_bag sums the selected decoder rows."""
    index = code.index or CodeIndex(code.rows, code.cols, *code.shape)
    return SparseDecode.apply(code.vals, W_dec, index)


def batch_topk(a: torch.Tensor, n: int, hint: float | torch.Tensor = 0.0,
               positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest entries of a (flattened): (values, flat indices), exactly as a.flatten().topk(n).

    With a hint (close below the expected cut, e.g. 0.9 x BatchTopK's running theta), first keep the entries
    above `hint` and run top-k among those: if at least n entries pass, the n largest are all among them, so the
    result is exact; otherwise try again at hint / 3 and hint / 9, then the full top-k. A pass at a good hint
    costs a compare and a scan of the B*d_sae entries (~4 ms at 1,024 x 4,608 on 2 CPU cores), the full top-k
    ~57 ms. A 0-dim tensor hint is used without being read back to the host (a tensor hint of 0 scans the
    positive entries); a float hint <= 0 goes straight to the full top-k.
    positive=True: only the positive ones of the n largest (fewer than n where fewer are positive).
    """
    flat = a.reshape(-1)
    tries = (hint, hint / 3, hint / 9) if torch.is_tensor(hint) or hint > 0 else ()
    for h in tries:
        idx = (flat > h).nonzero().squeeze(1)
        if idx.numel() >= n:
            vals, pos = flat[idx].topk(n, sorted=False)
            return vals, idx[pos]  # all above a hint >= 0 (theta is a mean of positive cuts): all positive
    vals, idx = flat.topk(n, sorted=False)
    if positive:
        keep = vals > 0
        vals, idx = vals[keep], idx[keep]
    return vals, idx


def batch_topk_static(a: torch.Tensor, n: int, hint: float | torch.Tensor, capacity: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_topk without a read-back to the host: every shape is fixed by (n, capacity), so a GPU never waits and
    the host queues the rest of the step at once. The n largest among the first `capacity` entries above
    `hint` >= 0 (a number or a 0-dim tensor; torch.nonzero_static, no sync): (values, flat indices, exact), where
    `exact` (a 0-dim bool tensor) says that between n and capacity entries passed the hint, so the result is
    exactly a.flatten().topk(n)'s, all positive where hint >= 0. Where it is False the values and indices are not
    the top n (some may be padding) and the caller must redo the selection exactly (the trainer does, see
    Trainer._forward_backward); with the hint at 0.9x the previous batch's cut, a 300-step training run on SmolLM2's
    layer 15 had between 1.31 n and 2.00 n entries above it at every step (benchmarks/results/selection_hint_cpu.txt)."""
    if capacity < n:
        raise ValueError(f"batch_topk_static needs room for the {n} entries it selects; capacity {capacity} < {n}")
    flat = a.reshape(-1)
    # one slot more than the capacity: the candidates found tell whether more than `capacity` passed (a count of
    # the whole mask, bool .sum(), took 11 ms on 2 CPU cores at 1,024 x 4,608; this, 0.04 ms)
    idx = torch.nonzero_static(flat > hint, size=capacity + 1, fill_value=-1).squeeze(1)
    real = idx >= 0
    count = real.sum()
    idx.clamp_min_(0)  # padding points at entry 0 (a valid index) and gets the value 0 below, which loses every
    vals, pos = flat[idx].masked_fill_(~real, 0).topk(n, sorted=False)  # comparison with a value above hint >= 0
    return vals, idx[pos], (count >= n) & (count <= capacity)


def flat_selection(flat: torch.Tensor, width: int, total: int, cut=None, exact=None) -> Selection:
    """Entries at flat indices of a [batch, width] matrix of `total` entries as a row-major Selection (sorted once
    here: the sparse kernels then group by row without sorting again)."""
    flat = flat[stable_argsort(flat, total)]
    return Selection(flat // width, flat % width, cut, exact)


def positive_entries(vals: torch.Tensor, flat: torch.Tensor, width: int, total: int) -> Selection:
    """Positive selected values at flat indices of a [batch, width] matrix of `total` entries
    (batch_topk(..., positive=True)) as a row-major Selection whose cut is the smallest kept value (None when
    nothing is kept)."""
    if not vals.numel():
        return Selection(flat, flat, None)
    return flat_selection(flat, width, total, vals.min().detach())


def row_topk(a: torch.Tensor, k: int, static: bool = False) -> Selection:
    """The k largest positive entries of each row of a [batch, d_sae]. static=True: all k of every row without a
    read-back (dropping the others is a mask whose size the host waits for), flagged exact when all are positive."""
    vals, idx = a.topk(k, dim=-1, sorted=False)
    rows = arange(a.shape[0], a.device).repeat_interleave(k, output_size=idx.numel())
    if static:
        return Selection(rows, idx.reshape(-1), None, (vals > 0).all())
    keep = vals.reshape(-1) > 0
    return Selection(rows[keep], idx.reshape(-1)[keep])


class ThresholdPseudoGrad(torch.autograd.Function):
    """JumpReLU's straight-through pseudo-derivatives to the thresholds, for the fast path: zeros in forward (one
    per entry in the rectangle window |a - theta| < bandwidth / 2), and in backward

        grad_theta[c] += -(scale(theta_c) / bandwidth) * g_e   for each window entry e in latent c,

    with scale = theta (the JumpReLU code's pseudo-derivative, g_e = dL/dz_e: decode these zeros with the code)
    or scale = 1 (the L0 step's, g_e = dL/d(step_e): add their sum to the count of active entries). `window` (bool,
    one per entry): which of the entries are in the window (None: all are)."""

    @staticmethod
    def forward(ctx, theta, cols, bandwidth, times_theta, window=None):
        ctx.save_for_backward(theta, cols, window)
        ctx.bandwidth, ctx.times_theta = bandwidth, times_theta
        ctx.mark_non_differentiable(cols)
        return theta.new_zeros(cols.shape[0])

    @staticmethod
    def backward(ctx, g):
        theta, cols, window = ctx.saved_tensors
        scale = theta[cols] if ctx.times_theta else torch.ones_like(g)
        g = g.to(theta.dtype) if window is None else g.to(theta.dtype) * window
        grad = torch.zeros_like(theta).index_add_(0, cols, -(scale / ctx.bandwidth) * g)
        return grad, None, None, None, None


class Entries(NamedTuple):
    """The entries of a [batch, width] matrix above a bound (`entries_above`), row-major. Found exactly, `valid` and
    `exact` are None and `count` is their number. Found into a fixed number of slots without a read-back, `valid`
    says which slots hold an entry (the others repeat the matrix's last entry and must count for nothing), `exact`
    (0-dim bool) that every entry found a slot, and `count` (0-dim tensor) how many there are (capacity + 1 where
    more did not fit)."""
    rows: torch.Tensor
    cols: torch.Tensor
    valid: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    count: torch.Tensor | int = 0


def entries_above(a: torch.Tensor, bound, capacity: int | None = None) -> Entries:
    """The entries of a [batch, width] above `bound` (a number, or one per column broadcast over rows): exactly (a
    nonzero, which reads their number back), or with `capacity` into that many slots without a read-back
    (nonzero_static, fixed shapes; see Entries)."""
    above = a > bound
    if capacity is None:
        rows, cols = above.nonzero(as_tuple=True)
        return Entries(rows, cols, None, None, rows.numel())
    flat = torch.nonzero_static(above.reshape(-1), size=capacity + 1, fill_value=-1).squeeze(1)
    count = (flat >= 0).sum()  # one slot more than the capacity tells whether more entries than slots were found
    flat = flat[:capacity]
    valid = flat >= 0
    flat = torch.where(valid, flat, a.numel() - 1)  # padding after every entry: row-major order kept
    return Entries(flat // a.shape[1], flat % a.shape[1], valid, count <= capacity, count)


def entry_slots(density: float, batch: int, width: int) -> int:
    """Slots for the entries of a [batch, width] matrix expected at `density` (the previous training step's): 1.25
    times as many, rounded up on a coarse grid (8 to 16 steps an octave, multiples of 1,024; at most batch x width),
    so that a count that drifts keeps its slots, and a recorded step (saekit.train.graphs) its shape, for many
    steps. Every slot goes through the sparse kernels, so the margin is small: a batch's count of entries varies
    little at training sizes (a sum over thousands of rows), and the trainer redoes the rare step whose entries did
    not fit."""
    want = max(1024, math.ceil(1.25 * density * batch * width))
    unit = max(1024, 1 << (want.bit_length() - 4))
    return min(batch * width, unit * math.ceil(want / unit))
