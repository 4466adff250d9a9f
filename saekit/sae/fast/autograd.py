"""The sparse path's autograd: the selected entries of a dense encode differentiated alone
(`SparseEncode`), a sparse decode (`SparseDecode`), JumpReLU's threshold pseudo-gradients on entries
(`ThresholdPseudoGrad`), and AuxK's dead columns whose gradients fold into the sparse ones
(`DeadColumns`). Each equals the dense path's gradients in math; tests/sae/test_reference.py checks
them against saekit.sae.reference."""

from __future__ import annotations

import torch

from .index import CodeIndex, SparseCode


class SparseEncode(torch.autograd.Function):
    """The selected entries `vals` = relu((x - b_dec) W_enc + b_enc)[rows, cols] of a dense encode
    that ran without autograd, differentiated through those entries only (rows, cols: the entries of
    `index`).

    Backward touches only the selected entries (sums of selected rows through embedding_bag) instead
    of two dense [batch, d_sae] x [d_sae, d_in] products. Gradients equal the dense path's exactly
    in math.
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
        # under bf16 autocast the values come out in bf16; gradients stay fp32
        g = g.to(W_enc.dtype)
        # the selected values are positive (relu passes them), so d vals / d a = 1. The products are
        # sums of selected rows, done as embedding_bag (faster than sparse matmuls:
        # benchmarks/results/sparse_kernels_cpu.txt): grad_W_enc[:, c] = sum_r g[r,c] xc[r];
        # grad_xc[r] = sum_c g[r,c] W_enc[:, c]
        grad_W_enc = index.col_sum(g, xc.to(W_enc.dtype)).t()  # [d_in, d_sae], latent-major
        # a gradient in another layout than its parameter is copied
        if grad_W_enc.stride() != W_enc.stride():
            # by autograd and again by fused Adam
            grad_W_enc = torch.empty_like(W_enc).copy_(grad_W_enc)
        grad_b_enc = torch.zeros(index.n_cols, dtype=g.dtype, device=g.device).index_add_(
            0, cols, g
        )
        # b_dec's gradient is -sum_r grad_xc[r] = -W_enc (sum_r g[r, :]) = -W_enc grad_b_enc: one
        # product with a vector; grad_xc itself (an embedding_bag over every entry and a transposed
        # copy of W_enc) only when the input needs a gradient (training data does not)
        grad_xc = (
            index.row_sum(g, W_enc.t().contiguous()).to(xc.dtype)
            if ctx.needs_input_grad[0]
            else None
        )
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[3] else None
        # AuxK's dead columns (DeadColumns; b_dec's comes through xc)
        if index.aux_grads is not None:
            slots, g_enc, g_b_enc, _ = index.aux_grads
            grad_W_enc.t().index_add_(0, slots, g_enc.to(grad_W_enc.dtype))
            grad_b_enc.index_add_(0, slots, g_b_enc.to(grad_b_enc.dtype))
        return grad_xc, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None, None, None


def sparse_encode(
    x, W_enc, b_enc, b_dec, index: CodeIndex, a: torch.Tensor, xc: torch.Tensor | None = None
) -> SparseCode:
    """The code of `index`'s entries, their values taken from pre-activations a (computed without
    autograd) and differentiable to the encoder's parameters through SparseEncode. xc: x - b_dec
    where the caller has it (paths.centred_pre_acts), else computed here."""
    rows, cols = index.rows, index.cols
    if index.perm is not None:  # the entries' own order (the code's), not the index's row order
        rows, cols = index.from_row(rows), index.from_row(cols)
    vals = SparseEncode.apply(x, W_enc, b_enc, b_dec, index, rows, cols, a, xc)
    return SparseCode(rows, cols, vals, (index.n_rows, index.n_cols), index)


class SparseDecode(torch.autograd.Function):
    """z W_dec for a sparse z (`vals` at `index`'s entries) as one embedding_bag over row groups;
    backward gives the values' gradients (embedding_bag's own per-sample-weight kernel) and W_dec's
    as sums of the output gradient's rows grouped by latent through the same index (no [B, d_sae]
    matrix, no sort of its own)."""

    @staticmethod
    def forward(ctx, vals, W_dec, index: CodeIndex):
        w = index.by_row(vals).to(W_dec.dtype)
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(
            W_dec, index.cols, index.row_offsets, False, 0, False, w
        )
        ctx.save_for_backward(vals, W_dec, offset2bag)
        ctx.index = index
        return out

    @staticmethod
    def backward(ctx, g):
        vals, W_dec, offset2bag = ctx.saved_tensors
        index = ctx.index
        g = g.contiguous().to(W_dec.dtype)
        grad_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g, W_dec, index.cols, index.row_offsets, offset2bag, 0
        )
        grad_W_dec = index.col_sum(vals, g)
        if index.aux_grads is not None:  # AuxK's dead rows of W_dec (DeadColumns)
            slots, _, _, g_dec = index.aux_grads
            grad_W_dec.index_add_(0, slots, g_dec.to(grad_W_dec.dtype))
        return index.from_row(grad_vals).to(vals.dtype), grad_W_dec, None


def sparse_stats(
    rows: torch.Tensor,
    cols: torch.Tensor,
    batch: int,
    d_sae: int,
    on: torch.Tensor | None = None,
    index: CodeIndex | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse path's (fired [d_sae] bool, l0 [batch]) from its active entries (where `on`, if
    given; else all, and `index`, their CodeIndex, counts each row's)."""
    if on is not None:  # counts of the active entries: the others add 0
        on = on.long()
        fired = torch.zeros(d_sae, dtype=torch.long, device=rows.device).index_add_(0, cols, on) > 0
        return fired, torch.zeros(batch, dtype=torch.long, device=rows.device).index_add_(
            0, rows, on
        )
    # index_fill_, not fired[cols] = True: on a GPU the assignment copies its True
    # from the host and waits
    fired = torch.zeros(d_sae, dtype=torch.bool, device=rows.device).index_fill_(0, cols, True)
    if index is not None:
        return fired, index.row_counts()
    # a count by index_add: bincount reads the largest index back from the device first
    return fired, torch.zeros(batch, dtype=torch.long, device=rows.device).index_add_(
        0, rows, torch.ones_like(rows)
    )


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """z W_dec for a sparse z without building it: embedding_bag sums the selected decoder rows."""
    index = code.index or CodeIndex(code.rows, code.cols, *code.shape)
    return SparseDecode.apply(code.vals, W_dec, index)


class ThresholdPseudoGrad(torch.autograd.Function):
    """JumpReLU's straight-through pseudo-derivatives to the thresholds, for the fast path: zeros in
    forward (one per entry in the rectangle window |a - theta| < bandwidth / 2), and in backward

        grad_theta[c] += -(scale(theta_c) / bandwidth) * g_e   for each window entry e in latent c,

    with scale = theta (the JumpReLU code's pseudo-derivative, g_e = dL/dz_e: decode these zeros
    with the code) or scale = 1 (the L0 step's, g_e = dL/d(step_e): add their sum to the count of
    active entries). `window` (bool, one per entry): which of the entries are in the window
    (None: all are)."""

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


class DeadColumns(torch.autograd.Function):
    """The dead latents' rows of W_enc_t, b_enc and W_dec (`slots`) for AuxK, whose gradients are
    not handed to autograd, which would give each parameter a zero-filled gradient of its full size
    ([d_sae, d_in]) to fill and add. Backward leaves them on the main code's CodeIndex (`aux_grads`;
    on its decode's too where that has its own), and the sparse encoder's and decoder's backward add
    them into their own gradients (SparseEncode, SparseDecode) with index_add_. That those run after
    this one is made sure by the graph: this takes the main code's values and reconstruction as
    inputs (not read: their gradient from here is none), so autograd runs their backward after
    this node's."""

    @staticmethod
    def forward(ctx, W_enc_t, b_enc, W_dec, slots, index, vals, x_hat, dec_index=None):
        # the encoder's; the decode's
        ctx.indexes = (index, index if dec_index is None else dec_index)
        ctx.save_for_backward(slots)
        return W_enc_t[slots], b_enc[slots], W_dec[slots]

    @staticmethod
    def backward(ctx, g_enc, g_b_enc, g_dec):
        (slots,) = ctx.saved_tensors
        for index in ctx.indexes:  # SparseEncode adds the encoder's two, SparseDecode W_dec's
            index.aux_grads = (slots, g_enc, g_b_enc, g_dec)
        return None, None, None, None, None, None, None, None
