"""Selections for the sparse path: the architecture's training selection (`top_entries`) and the
entries above a bound (`entries`), each exact (saekit.sae.selections) or, where the plan allows
(`Plan.without_read_backs`), made into fixed shapes without reading back from the device and
flagged exact or not. One rule (`slots`) sizes every fixed shape."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..outputs import Selection
from ..selections import batch_topk, topk
from ..step import Step
from .hints import Plan
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


def top_entries(
    sae, a: torch.Tensor, step: Step, plan: Plan
) -> tuple[Selection, torch.Tensor | None]:
    """The architecture's training selection of pre-activations a [batch, d_sae], row-major: each
    row's top-k (TopK, `per_token_k`) or the batch top-k (BatchTopK, Matryoshka), the same entries
    as its `select(a, "train")`. Returns (the selection, None or, where it was made without
    read-backs, a 0-dim bool saying whether it was exact: the trainer redoes a step where it was
    not)."""
    static = plan.without_read_backs(a.device, step.distributed)
    if sae.per_token_k:
        return row_topk(a, sae.cfg.k) if static else (topk(a, sae.cfg.k), None)
    hint = 0.0 if plan.cut_hint is None else plan.cut_hint * HINT_FACTOR
    if plan.cut_hint is not None and static:
        n = min(a.shape[0] * sae.cfg.k, a.numel())
        vals, flat, exact = top_n_static(a, n, hint, min(CANDIDATES * n, a.numel()))
        order = stable_argsort(flat, a.numel())
        return Selection(flat[order] // a.shape[1], flat[order] % a.shape[1], vals.min()), exact
    return batch_topk(a, sae.cfg.k, hint, step.distributed), None


def entries(a: torch.Tensor, bound, step: Step, plan: Plan) -> Entries:
    """The entries of a above `bound` (JumpReLU, ReLU): exactly, or where the plan allows and knows
    the previous step's density, into slots for 1.25 times that many without a read-back."""
    if plan.density_hint is None or not plan.without_read_backs(a.device, step.distributed):
        return entries_above(a, bound)
    return entries_above(a, bound, entry_slots(plan.density_hint, a.numel()))


def entry_slots(density: float, size: int) -> int:
    """Slots for the entries expected at `density` of a matrix of `size` entries: 1.25 times as many
    (a batch's count varies little at training sizes, and the trainer redoes the rare step whose
    entries did not fit)."""
    return slots(max(1.0, 1.25 * density * size), 1024, size)


def top_n_static(
    a: torch.Tensor, n: int, hint: float | torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """saekit.sae.selections.top_n without a read-back to the host, kept apart because every shape
    is fixed by (n, capacity), so a GPU never waits and the host queues the rest of the step at
    once. The n largest among the first `capacity` entries above `hint` >= 0 (a number or a 0-dim
    tensor; torch.nonzero_static, no sync): (values, flat indices, exact), where `exact` (a 0-dim
    bool tensor) says that between n and capacity entries passed the hint, so the result is exactly
    a.flatten().topk(n)'s, all positive where hint >= 0. Where it is False the values and indices
    are not the top n (some may be padding) and the caller must redo the selection exactly (the
    trainer does). How many entries pass 0.9x the previous cut in a real run:
    benchmarks/results/selection_hint_cpu.txt."""
    if capacity < n:
        raise ValueError(
            f"top_n_static needs room for the {n} entries it selects; capacity {capacity} < {n}"
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


def row_topk(a: torch.Tensor, k: int) -> tuple[Selection, torch.Tensor]:
    """saekit.sae.selections.topk without a read-back, kept apart because it keeps all k of every
    row (dropping the others is a mask whose size the host waits for): exact when all are
    positive."""
    vals, idx = a.topk(k, dim=-1, sorted=False)
    rows = arange(a.shape[0], a.device).repeat_interleave(k, output_size=idx.numel())
    return Selection(rows, idx.reshape(-1)), (vals > 0).all()


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
