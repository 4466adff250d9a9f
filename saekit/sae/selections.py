"""The exact selections the architectures make, under the names of saekit/sae/reference.py:
`batch_topk` (BatchTopK, Matryoshka), `topk` (TopK) and `above` (a threshold: BatchTopK's θ at
inference, JumpReLU, ReLU). Each gives a `Selection`; the speed layer (saekit.sae.fast) makes the
same selections without reading back from the device."""

from __future__ import annotations

import torch

from .. import distributed as D
from .outputs import Selection


def batch_topk(
    acts_BF: torch.Tensor,
    k: float,
    look_above: float | torch.Tensor = 0.0,
    distributed: bool = False,
    row_major: bool = True,
) -> Selection:
    """BatchTopK: the batch's B*k largest positive pre-activations, and their cut (the smallest
    kept, θ's sample; None where none is positive). A fractional k (an L0) keeps round(B*k).

    look_above: a value close below the expected cut (θ, or the previous step's cut), where the
    search looks first; the result is exact either way. distributed: over the global batch of every
    rank (torch.distributed). row_major=False: the entries in any order (a mask needs none)."""
    if distributed:
        flat, _, cut = D.global_batch_topk(acts_BF, int(k), look_above, top_n)
    else:
        n = min(int(round(acts_BF.shape[0] * k)), acts_BF.numel())
        vals, flat = top_n(acts_BF, n, look_above, positive=True)
        cut = vals.min().detach() if vals.numel() else None
    if row_major:
        flat = flat.to(torch.int32).sort().values.long() if flat.numel() else flat
    width = acts_BF.shape[1]
    return Selection(flat // width, flat % width, cut)


def topk(acts_BF: torch.Tensor, k: int) -> Selection:
    """TopK: each token's k largest positive pre-activations, row-major."""
    vals_BK, idx_BK = acts_BF.topk(k, dim=-1, sorted=False)
    rows_BK = torch.arange(acts_BF.shape[0], device=acts_BF.device)[:, None].expand_as(idx_BK)
    keep_BK = vals_BK > 0
    return Selection(rows_BK[keep_BK], idx_BK[keep_BK])


def above(acts_BF: torch.Tensor, theta) -> Selection:
    """The entries above a threshold (one number, or one per latent broadcast over tokens)."""
    return Selection(*(acts_BF > theta).nonzero(as_tuple=True))


def top_n(
    a: torch.Tensor, n: int, look_above: float | torch.Tensor = 0.0, positive: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest entries of a (flattened): (values, flat indices), exactly as
    a.flatten().topk(n), in no particular order.

    With `look_above` (close below the expected cut), first keep the entries above it and run top-k
    among those: if at least n pass, the n largest are all among them, so the result is exact;
    otherwise try again at a third and a ninth of it, then the full top-k. A compare and a short
    top-k cost far less than a top-k over every entry (benchmarks/results/selection_hint_cpu.txt). A
    0-dim tensor is used without being read back to the host (a tensor of 0 scans the positive
    entries); a number <= 0 goes straight to the full top-k. positive=True: only the positive ones
    of the n largest (fewer than n where fewer are positive)."""
    flat = a.reshape(-1)
    h = look_above
    tries = (h, h / 3, h / 9) if torch.is_tensor(h) or h > 0 else ()
    for bound in tries:
        idx = (flat > bound).nonzero().squeeze(1)
        if idx.numel() >= n:
            vals, pos = flat[idx].topk(n, sorted=False)
            # all above a bound >= 0 (θ is a mean of positive cuts): all positive
            return vals, idx[pos]
    vals, idx = flat.topk(n, sorted=False)
    if positive:
        keep = vals > 0
        vals, idx = vals[keep], idx[keep]
    return vals, idx
