from dataclasses import replace

import pytest
import torch

from saekit.sae import (
    ARCHS,
    SAEConfig,
    Step,
    make_sae,
)
from saekit.sae.fast import Plan, training_loss
from saekit.sae.step import PLAIN


def _read_back_counter():
    from readbacks import DispatchReadBacks

    return DispatchReadBacks()


def _exact_and_sync_free(arch: str, n_dead: int, seed: int):
    """Two equal SAEs with n_dead dead latents, and the plan that has the second select without
    read-backs (its dead count known)."""
    torch.manual_seed(seed)
    cfg = SAEConfig(arch=arch, d_in=24, d_sae=96, k=4, k_aux=16, dead_tokens=10, normalize="none")
    exact, free = make_sae(cfg), make_sae(cfg)
    free.load_state_dict(exact.state_dict())
    for s in (exact, free):
        s.tokens_since_fired[:n_dead] = 100
    return exact, free, torch.randn(48, 24), Plan(sync_free=True, n_dead=n_dead)


def _same_step(exact, free, o1, o2) -> None:
    """The two outputs' loss, code statistics and every gradient are identical, bit for bit."""
    torch.testing.assert_close(o1.loss, o2.loss, rtol=0, atol=0)
    assert torch.equal(o1.l0, o2.l0) and torch.equal(o1.fired, o2.fired)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(exact.named_parameters(), free.named_parameters()):
        assert torch.equal(p1.grad, p2.grad), n


@pytest.mark.parametrize("n_dead", [0, 10, 40])
def test_sync_free_batchtopk_loss_equals_the_exact_one_without_a_read_back(
    n_dead, sparse_everywhere
):
    """BatchTopK's selection without read-backs (hint: 0.9x the previous step's cut; the dead
    latents' number known from the step before) gives the exact path's loss, code and every
    gradient, flagged exact, and reads nothing back; a hint above this batch's cut leaves too few
    candidates and is flagged."""
    exact, free, x, plan = _exact_and_sync_free("batchtopk", n_dead, seed=3)
    o1 = exact.training_loss(x)
    assert o1.exact is None and o1.path == "sparse"  # no previous cut: the exact selection
    # the previous batch's cut, a little above this one's
    plan = replace(plan, cut_hint=float(o1.cut) * 1.05)
    with _read_back_counter() as seen:
        o2 = training_loss(free, x, plan=plan)
    assert (
        seen.found == [] and bool(o2.exact) and o2.path == "sparse" and torch.equal(o1.cut, o2.cut)
    )
    assert (float(o1.terms["aux"]) > 0) == (n_dead > 0)
    _same_step(exact, free, o1, o2)
    # far above this batch's cut: fewer than B*k candidates
    plan = replace(plan, cut_hint=float(o1.cut) * 2)
    assert not bool(training_loss(free, x, plan=plan).exact)
    # as the Trainer redoes such a step
    assert training_loss(free, x, plan=replace(plan, exact=True)).exact is None


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_sync_free_thresholded_codes_equal_the_exact_ones_without_a_read_back(
    arch, sparse_everywhere
):
    """JumpReLU and ReLU-L1 find their entries without a read-back, into slots sized by the previous
    step's density (fast.entries): the exact path's loss, code statistics and every gradient, bit
    for bit, flagged exact, and nothing read back; too few slots are flagged, and with
    Plan(exact=True) the entries are found exactly."""
    exact, free, x, plan = _exact_and_sync_free(arch, 0, seed=5)
    o1 = exact.training_loss(x)
    assert o1.exact is None and o1.count is None and o1.path == "sparse" and o1.density > 0
    plan = replace(plan, density_hint=o1.density)  # as the trainer remembers it
    with _read_back_counter() as seen:
        o2 = training_loss(free, x, plan=plan)
    n = round(o1.density * x.shape[0] * 96)
    assert seen.found == [] and bool(o2.exact) and o2.path == "sparse" and int(o2.count) == n > 1024
    _same_step(exact, free, o1, o2)
    plan = replace(plan, density_hint=0.0)  # the fewest slots (1,024): fewer than the entries
    assert not bool(training_loss(free, x, plan=plan).exact)
    # as the Trainer redoes such a step
    assert training_loss(free, x, plan=replace(plan, exact=True)).exact is None


def test_sync_free_topk_selection_equals_the_exact_one_or_says_so(sparse_everywhere):
    """TopK without read-backs keeps all k of every row (the exact selection drops the non-positive
    ones, a mask the host waits for): the same loss and gradients, flagged exact, while every
    kept value is positive; not otherwise."""
    exact, free, x, plan = _exact_and_sync_free("topk", 10, seed=4)
    o1 = exact.training_loss(x)
    with _read_back_counter() as seen:
        o2 = training_loss(free, x, plan=plan)
    assert seen.found == [] and bool(o2.exact) and o1.exact is None and o2.path == "sparse"
    _same_step(exact, free, o1, o2)
    with torch.no_grad():
        # no positive pre-activation on a zero input: the 4 kept of each row are not positive
        free.b_enc.fill_(-1.0)
    assert not bool(training_loss(free, x[:8] * 0, plan=plan).exact)


def test_rectangle_window_is_the_band_around_theta():
    """JumpReLU's window |a - theta| < bandwidth / 2 per latent, as two compares against its bounds
    (the reference and the fast path share it), equals the band computed in float64 wherever an
    entry is not on its edge."""
    from saekit.sae.architectures.jumprelu import rectangle
    from saekit.sae.fast.select import entries_above

    torch.manual_seed(5)
    a, theta, bw = torch.rand(64, 40) * 3, torch.rand(40) + 1, 0.3
    band = (a.double() - theta.double()).abs() < bw / 2
    edge = ((a.double() - theta.double()).abs() - bw / 2).abs() < 1e-5
    got = rectangle(a, theta, bw)
    assert got.dtype == torch.bool and band.any() and (~band).any()
    assert torch.equal(got[~edge], band[~edge])
    # one scan finds both sets (the fast path's), row-major; values split them
    e = entries_above(a, theta - bw / 2)
    v, t = a[e.rows, e.cols], theta[e.cols]
    entries = torch.stack([e.rows, e.cols])
    assert torch.equal(entries[:, rectangle(v, t, bw)], got.nonzero().t())
    assert torch.equal(entries[:, v > t], (a > theta).nonzero().t())
    assert (v > t).any() and rectangle(v, t, bw).any()


def test_entries_found_without_a_read_back_equal_the_exact_ones_or_say_so():
    """entries_above with a capacity: fixed shapes, the entries first (row-major, as the exact
    ones), then padding that repeats the last entry of the matrix and is marked invalid; exact when
    they all fit, and the count tells the next step how many slots to make (entry_slots: 1.25x
    rounded up on the slots' grid, at least 1,024)."""
    from saekit.sae.fast.select import entries_above, entry_slots

    torch.manual_seed(3)
    a = torch.randn(50, 80)
    exact = entries_above(a, 1.0)
    n = exact.count
    assert exact.valid is None and n == exact.rows.numel() > 0
    for cap in (n, n + 37):
        e = entries_above(a, 1.0, cap)
        assert (
            e.rows.shape == (cap,)
            and bool(e.exact)
            and int(e.count) == n
            and int(e.valid.sum()) == n
        )
        assert torch.equal(e.rows[:n], exact.rows) and torch.equal(e.cols[:n], exact.cols)
        assert bool((e.rows[n:] == 49).all() and (e.cols[n:] == 79).all()) and not e.valid[n:].any()
        assert bool((e.rows[1:] >= e.rows[:-1]).all())  # row-major, padding included
    short = entries_above(a, 1.0, n - 1)
    assert not bool(short.exact) and int(short.count) == n and bool(short.valid.all())
    assert (
        entry_slots(0.0, 4096) == 1024
        and entry_slots(0.5, 4096) == 3072
        and entry_slots(0.9, 4096) == 4096
    )
    n = 0.002 * 4096 * 24576  # 201,327 entries at the paper's size
    slots = entry_slots(0.002, 4096 * 24576)
    assert slots % 1024 == 0 and 1.25 * n <= slots <= 1.25 * n * 1.125 + 1024
    assert entry_slots(0.002 * 1.01, 4096 * 24576) == slots  # a count that drifts keeps its slots


@pytest.mark.parametrize("arch", ARCHS)
def test_every_selection_is_row_major(arch):
    """The sparse kernels group a selection's entries by row without sorting them: every select
    keeps rows in order (BatchTopK's batch top-k comes out of topk in no order and is sorted)."""
    torch.manual_seed(0)
    sae = make_sae(arch=arch, d_in=16, d_sae=64, k=4, target_l0=4.0)
    with torch.no_grad():
        a = sae.pre_acts(torch.randn(40, 16))
    modes = ("train", "batch") if sae.has_theta else (None,)
    for mode in modes:
        sel = sae.select(a, mode)
        assert sel.rows.numel() > 0 and bool((sel.rows[1:] >= sel.rows[:-1]).all()), mode
    if sae.has_theta:
        sae.set_threshold(float(a.flatten().topk(160).values.min()))
        sel = sae.select(a, "threshold")
        assert bool((sel.rows[1:] >= sel.rows[:-1]).all())


def test_top_n_looking_above_a_hint_is_exact():
    from saekit.sae.selections import top_n

    torch.manual_seed(0)
    a = torch.relu(torch.randn(64, 300))
    n = 64 * 5
    ref_vals, ref_idx = a.reshape(-1).topk(n)
    # 2.5 and 50 leave fewer than n candidates: full top-k fallback; a tensor hint
    # stays on the device
    for hint in (
        0.0,
        0.5,
        1.0,
        2.5,
        50.0,
        torch.tensor(0.0),
        torch.tensor(1.0),
        torch.tensor(50.0),
    ):
        vals, idx = top_n(a, n, hint)
        assert set(idx.tolist()) == set(ref_idx.tolist()), hint
        torch.testing.assert_close(vals.sort().values, ref_vals.sort().values)


def test_static_top_n_is_exact_or_says_so():
    """top_n_static: fixed shapes, no read-back; exact (the same entries and values as a full
    top-k) whenever between n and `capacity` entries pass the hint, and flagged otherwise (too
    few, or too many to hold)."""
    from saekit.sae.fast.select import top_n_static

    torch.manual_seed(0)
    a = torch.relu(torch.randn(64, 300))
    n = 64 * 5
    ref_vals, ref_idx = a.reshape(-1).topk(n)
    seen = set()
    for factor in (0.0, 0.5, 0.9, 1.0, 1.2):
        hint = ref_vals.min() * factor
        count = int((a > hint).sum())
        for capacity in {n, 2 * n, 3 * n, max(n, count), max(n, count - 1)}:
            vals, idx, exact = top_n_static(a, n, hint, capacity)
            assert (
                vals.shape == idx.shape == (n,) and exact.dtype == torch.bool and exact.dim() == 0
            )
            assert bool(exact) == (n <= count <= capacity), (factor, capacity, count)
            seen.add(bool(exact))
            if exact:
                assert set(idx.tolist()) == set(ref_idx.tolist()), (factor, capacity)
                torch.testing.assert_close(vals.sort().values, ref_vals.sort().values)
            # even when not exact: valid indices
            assert int(idx.min()) >= 0 and int(idx.max()) < a.numel()
    assert seen == {True, False}
    with pytest.raises(ValueError, match="capacity"):
        top_n_static(a, n, ref_vals.min(), n - 1)


def test_dead_latents_whose_number_is_known_are_found_without_a_read_back():
    """The fast path's AuxK takes the number of dead latents the plan says (the trainer's one
    read-back of the step before): no read-back of its own; where the plan does not know it, it
    is read back."""
    from saekit.sae.fast import auxk

    sae = make_sae(arch="batchtopk", d_in=8, d_sae=64, k=2, dead_tokens=10)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[::3] = True
    since, n_dead = sae.next_dead_counters(fired, 20)
    # the counters are left alone
    assert int(n_dead) == 64 - 22 and int(sae.tokens_since_fired.sum()) == 0
    sae.tokens_since_fired.copy_(since)
    plan = Plan(n_dead=int(n_dead))
    with _read_back_counter() as seen:
        dead = auxk.dead_latents(sae, PLAIN, plan, pad=False)
    assert seen.found == [] and torch.equal(dead, (~fired).nonzero().squeeze(1))
    sae.tokens_since_fired[:6] = 0  # changed by hand, and the plan does not know the number
    with _read_back_counter() as seen:
        dead = auxk.dead_latents(sae, PLAIN, Plan(), pad=False)
    assert len(seen.found) == 1 and "nonzero" in seen.found[0]
    assert torch.equal(dead, sae.dead_mask().nonzero().squeeze(1)) and dead.numel() == 64 - 22 - 4
    assert auxk.dead_latents(sae, PLAIN, Plan(n_dead=0), pad=False) is None
    assert auxk.dead_latents(sae, Step(aux=False), Plan(), pad=False) is None
