"""Selections for the sparse path: the batch top-k, each row's top-k and the entries above a bound,
each exact or, where the step allows (`Step.without_read_backs`), made into fixed shapes without
reading back from the device and flagged exact or not. One rule (`slots`) sizes every fixed
shape."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ... import distributed as D
from ..outputs import Selection
from ..step import PLAIN, Step
from .index import arange, stable_argsort

HINT_FACTOR = 0.9  # the batch top-k looks first above this fraction of the previous step's cut
CANDIDATES = 3  # without read-backs, room for this many times the n entries selected


def slots(n: float, unit: int, limit: int) -> int:
    """Room for n items as a fixed shape: n rounded up on a coarse grid (8 to 16 steps an octave,
    multiples of `unit`), at most `limit`; 0 for none. A count that drifts keeps its shape for
    many steps."""
    n = math.ceil(n)
    if n <= 0:
        return 0
    grain = max(unit, 1 << max(0, n.bit_length() - 4))
    return min(limit, grain * -(-n // grain))


def batch_top(a: torch.Tensor, k: int, step: Step = PLAIN, row_major: bool = True) -> Selection:
    """The batch's top batch*k positive entries of pre-activations a [batch, width] (BatchTopK),
    with their cut: over the global batch under torch.distributed; without read-backs where the step
    allows and has a hint (flagged exact or not); else exactly, looking first above the hint.
    row_major=False: in any order (a mask needs none, and sorting costs)."""
    hint = 0.0 if step.cut_hint is None else step.cut_hint * HINT_FACTOR
    if step.distributed:
        flat, _, cut = D.global_batch_topk(a, k, hint, batch_topk)
        return flat_selection(flat, a.shape[1], a.numel(), cut, sort=row_major)
    n = min(a.shape[0] * k, a.numel())
    if step.cut_hint is not None and step.without_read_backs(a.device):
        vals, flat, exact = batch_topk_static(a, n, hint, min(CANDIDATES * n, a.numel()))
        return flat_selection(flat, a.shape[1], a.numel(), vals.min(), exact)
    vals, flat = batch_topk(a, n, hint, positive=True)
    cut = vals.min().detach() if vals.numel() else None
    return flat_selection(flat, a.shape[1], a.numel(), cut, sort=row_major)


def row_top(a: torch.Tensor, k: int, step: Step = PLAIN) -> Selection:
    """Each row's k largest positive entries (TopK); without read-backs where the step allows."""
    return row_topk(a, k, static=step.without_read_backs(a.device))


def entries(a: torch.Tensor, bound, step: Step = PLAIN) -> Entries:
    """The entries of a above `bound` (JumpReLU, ReLU): exactly, or where the step allows and knows
    the previous step's density, into slots for 1.25 times that many without a read-back."""
    if step.density_hint is None or not step.without_read_backs(a.device):
        return entries_above(a, bound)
    return entries_above(a, bound, entry_slots(step.density_hint, a.numel()))


def entry_slots(density: float, size: int) -> int:
    """Slots for the entries expected at `density` of a matrix of `size` entries: 1.25 times as many
    (a batch's count varies little at training sizes, and the trainer redoes the rare step whose
    entries did not fit)."""
    return slots(max(1.0, 1.25 * density * size), 1024, size)


def batch_topk(
    a: torch.Tensor, n: int, hint: float | torch.Tensor = 0.0, positive: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest entries of a (flattened): (values, flat indices), exactly as
    a.flatten().topk(n).

    With a hint (close below the expected cut), first keep the entries above `hint` and run top-k
    among those: if at least n entries pass, the n largest are all among them, so the result is
    exact; otherwise try again at hint / 3 and hint / 9, then the full top-k. A compare and a short
    top-k cost far less than a top-k over every entry (benchmarks/results/selection_hint_cpu.txt). A
    0-dim tensor hint is used without being read back to the host (a tensor hint of 0 scans the
    positive entries); a float hint <= 0 goes straight to the full top-k. positive=True: only the
    positive ones of the n largest (fewer than n where fewer are positive).
    """
    flat = a.reshape(-1)
    tries = (hint, hint / 3, hint / 9) if torch.is_tensor(hint) or hint > 0 else ()
    for h in tries:
        idx = (flat > h).nonzero().squeeze(1)
        if idx.numel() >= n:
            vals, pos = flat[idx].topk(n, sorted=False)
            # all above a hint >= 0 (theta is a mean of positive cuts): all positive
            return vals, idx[pos]
    vals, idx = flat.topk(n, sorted=False)
    if positive:
        keep = vals > 0
        vals, idx = vals[keep], idx[keep]
    return vals, idx


def batch_topk_static(
    a: torch.Tensor, n: int, hint: float | torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch_topk without a read-back to the host: every shape is fixed by (n, capacity), so a GPU
    never waits and the host queues the rest of the step at once. The n largest among the first
    `capacity` entries above `hint` >= 0 (a number or a 0-dim tensor; torch.nonzero_static, no
    sync): (values, flat indices, exact), where `exact` (a 0-dim bool tensor) says that between n
    and capacity entries passed the hint, so the result is exactly a.flatten().topk(n)'s, all
    positive where hint >= 0. Where it is False the values and indices are not the top n (some may
    be padding) and the caller must redo the selection exactly (the trainer does). How many
    entries pass 0.9x the previous cut in a real run: benchmarks/results/selection_hint_cpu.txt."""
    if capacity < n:
        raise ValueError(
            f"batch_topk_static needs room for the {n} entries "
            f"it selects; capacity {capacity} < {n}"
        )
    flat = a.reshape(-1)
    # one slot more than the capacity tells whether more than `capacity` passed, without
    # counting the whole mask
    idx = torch.nonzero_static(flat > hint, size=capacity + 1, fill_value=-1).squeeze(1)
    real = idx >= 0
    count = real.sum()
    # padding points at entry 0 (a valid index) and gets the value 0 below, which loses every
    idx.clamp_min_(0)
    # comparison with a value above hint >= 0
    vals, pos = flat[idx].masked_fill_(~real, 0).topk(n, sorted=False)
    return vals, idx[pos], (count >= n) & (count <= capacity)


def flat_selection(
    flat: torch.Tensor, width: int, total: int, cut=None, exact=None, sort=True
) -> Selection:
    """Entries at flat indices of a [batch, width] matrix of `total` entries as a Selection,
    row-major where `sort` (sorted once here: the sparse kernels then group by row without
    sorting again)."""
    if sort:
        flat = flat[stable_argsort(flat, total)]
    return Selection(flat // width, flat % width, cut, exact)


def row_topk(a: torch.Tensor, k: int, static: bool = False) -> Selection:
    """The k largest positive entries of each row of a [batch, d_sae]. static=True: all k of every
    row without a read-back (dropping the others is a mask whose size the host waits for),
    flagged exact when all are positive."""
    vals, idx = a.topk(k, dim=-1, sorted=False)
    rows = arange(a.shape[0], a.device).repeat_interleave(k, output_size=idx.numel())
    if static:
        return Selection(rows, idx.reshape(-1), None, (vals > 0).all())
    keep = vals.reshape(-1) > 0
    return Selection(rows[keep], idx.reshape(-1)[keep])


class Entries(NamedTuple):
    """The entries of a [batch, width] matrix above a bound (`entries_above`), row-major. Found
    exactly, `valid` and `exact` are None and `count` is their number. Found into a fixed number of
    slots without a read-back, `valid` says which slots hold an entry (the others repeat the
    matrix's last entry and must count for nothing), `exact` (0-dim bool) that every entry found a
    slot, and `count` (0-dim tensor) how many there are (capacity + 1 where more did not fit)."""

    rows: torch.Tensor
    cols: torch.Tensor
    valid: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    count: torch.Tensor | int = 0


def entries_above(a: torch.Tensor, bound, capacity: int | None = None) -> Entries:
    """The entries of a [batch, width] above `bound` (a number, or one per column broadcast over
    rows): exactly (a nonzero, which reads their number back), or with `capacity` into that many
    slots without a read-back (nonzero_static, fixed shapes; see Entries)."""
    above = a > bound
    if capacity is None:
        rows, cols = above.nonzero(as_tuple=True)
        return Entries(rows, cols, None, None, rows.numel())
    flat = torch.nonzero_static(above.reshape(-1), size=capacity + 1, fill_value=-1).squeeze(1)
    # one slot more than the capacity tells whether more entries than slots were found
    count = (flat >= 0).sum()
    flat = flat[:capacity]
    valid = flat >= 0
    # padding after every entry: row-major order kept
    flat = torch.where(valid, flat, a.numel() - 1)
    return Entries(flat // a.shape[1], flat % a.shape[1], valid, count <= capacity, count)
