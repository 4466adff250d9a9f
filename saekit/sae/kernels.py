"""The numerical pieces the SAEs are built from: selections and sparse codes, the sparse encoder's autograd,
embedding_bag row sums, exact top-k over a whole batch, and JumpReLU's straight-through step functions."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Selection(NamedTuple):
    """What an architecture's `select` keeps of pre-activations a [batch, d_sae]: the active entries'
    rows (token) and cols (latent), and, where it cuts by value over the batch (BatchTopK in training),
    `cut`: the smallest kept value (a 0-dim tensor; None otherwise). BatchTopK's theta is the mean cut."""
    rows: torch.Tensor
    cols: torch.Tensor
    cut: torch.Tensor | None = None


class SparseCode(NamedTuple):
    """Active entries of a code: rows (token), cols (latent), vals; `shape` = (batch, d_sae)."""
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, int]

    def dense(self) -> torch.Tensor:
        z = self.vals.new_zeros(self.shape)
        z[self.rows, self.cols] = self.vals
        return z


def rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


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
        grad_theta = (-(theta / bw) * rectangle((a - theta) / bw) * g).sum(0)
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
        grad_theta = (-(1.0 / bw) * rectangle((a - theta) / bw) * g).sum(0)
        return torch.zeros_like(a), grad_theta, None


class SparseEncode(torch.autograd.Function):
    """The selected entries `vals` = relu((x - b_dec) W_enc + b_enc)[rows, cols] of a dense encode that ran
    without autograd, differentiated through those entries only.

    Backward touches only the selected entries (sums of selected rows through embedding_bag) instead of two
    dense [batch, d_sae] x [d_sae, d_in] products. Gradients equal the dense path's exactly in math.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, rows, cols, vals):
        ctx.save_for_backward(x - b_dec, W_enc, rows, cols)
        ctx.n_latents = b_enc.shape[0]
        ctx.mark_non_differentiable(rows, cols)
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        xc, W_enc, rows, cols = ctx.saved_tensors
        B, Fd = xc.shape[0], ctx.n_latents
        g = g.to(W_enc.dtype)  # under bf16 autocast the values come out in bf16; gradients stay fp32
        # the selected values are positive (relu passes them), so d vals / d a = 1. Both products are
        # sums of selected rows, done as embedding_bag (10x faster than sparse COO matmuls on CPU):
        # grad_xc[r] = sum_c g[r,c] W_enc[:, c];  grad_W_enc[:, c] = sum_r g[r,c] xc[r]
        grad_xc = bag_sum(rows, cols, g, W_enc.t().contiguous(), B)  # [B, d_in]
        grad_W_enc = bag_sum(cols, rows, g, xc.to(W_enc.dtype), Fd).t()  # [d_in, d_sae], latent-major
        if grad_W_enc.stride() != W_enc.stride():  # a gradient in another layout than its parameter is copied
            grad_W_enc = torch.empty_like(W_enc).copy_(grad_W_enc)  # by autograd and again by fused Adam
        grad_b_enc = torch.zeros(Fd, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_xc.to(xc.dtype), grad_W_enc, grad_b_enc, -grad_xc.sum(0), None, None, None


def bag_sum(bags: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, table: torch.Tensor, n_bags: int) -> torch.Tensor:
    """out[b] = sum over entries e with bags[e] == b of w[e] * table[idx[e]]: [n_bags, table width]."""
    order = torch.argsort(bags, stable=True)
    offsets = torch.searchsorted(bags[order], torch.arange(n_bags, device=bags.device))
    return F.embedding_bag(idx[order], table, offsets, mode="sum", per_sample_weights=w[order].to(table.dtype),
                           include_last_offset=False)


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """z W_dec for a sparse z without building it: embedding_bag sums the selected decoder rows."""
    return bag_sum(code.rows, code.cols, code.vals, W_dec, code.shape[0])


def batch_topk(a: torch.Tensor, n: int, hint: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest entries of a (flattened): (values, flat indices), exactly as a.flatten().topk(n).

    With hint > 0 (close below the expected cut, e.g. 0.9 x BatchTopK's running theta), first keep the entries
    above `hint` and run top-k among those: if at least n entries pass, the n largest are all among them, so the
    result is exact; otherwise try again at hint / 3 and hint / 9, then the full top-k. A pass at a good hint
    costs a compare and a scan of the B*d_sae entries (~4 ms at 1,024 x 4,608 on 2 CPU cores), the full top-k
    ~57 ms.
    """
    flat = a.reshape(-1)
    for h in (hint, hint / 3, hint / 9) if hint > 0 else ():
        idx = (flat > h).nonzero().squeeze(1)
        if idx.numel() >= n:
            vals, pos = flat[idx].topk(n, sorted=False)
            return vals, idx[pos]
    return flat.topk(n, sorted=False)


def positive_entries(vals: torch.Tensor, flat: torch.Tensor, width: int) -> Selection:
    """The positive ones of selected values at flat indices of a [batch, width] matrix, as a Selection whose
    cut is the smallest kept value (None when nothing is kept)."""
    keep = vals > 0
    flat, vals = flat[keep], vals[keep]
    return Selection(flat // width, flat % width, vals.min().detach() if vals.numel() else None)


def row_topk(a: torch.Tensor, k: int) -> Selection:
    """The k largest positive entries of each row of a [batch, d_sae]."""
    vals, idx = a.topk(k, dim=-1, sorted=False)
    rows = torch.arange(a.shape[0], device=a.device).repeat_interleave(idx.shape[1])
    keep = vals.reshape(-1) > 0
    return Selection(rows[keep], idx.reshape(-1)[keep])


class ThresholdPseudoGrad(torch.autograd.Function):
    """JumpReLU's straight-through pseudo-derivatives to the thresholds, for the fast path: zeros in forward (one
    per entry in the rectangle window |a - theta| < bandwidth / 2), and in backward

        grad_theta[c] += -(scale(theta_c) / bandwidth) * g_e   for each window entry e in latent c,

    with scale = theta (the JumpReLU code's pseudo-derivative, g_e = dL/dz_e: decode these zeros with the code)
    or scale = 1 (the L0 step's, g_e = dL/d(step_e): add their sum to the count of active entries)."""

    @staticmethod
    def forward(ctx, theta, cols, bandwidth, times_theta):
        ctx.save_for_backward(theta, cols)
        ctx.bandwidth, ctx.times_theta = bandwidth, times_theta
        ctx.mark_non_differentiable(cols)
        return theta.new_zeros(cols.shape[0])

    @staticmethod
    def backward(ctx, g):
        theta, cols = ctx.saved_tensors
        scale = theta[cols] if ctx.times_theta else torch.ones_like(g)
        grad = torch.zeros_like(theta).index_add_(0, cols, -(scale / ctx.bandwidth) * g.to(theta.dtype))
        return grad, None, None, None


def threshold_window(a: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the entries of a [batch, d_sae] where JumpReLU's rectangle kernel is non-zero."""
    return rectangle((a - theta) / bandwidth).nonzero(as_tuple=True)
