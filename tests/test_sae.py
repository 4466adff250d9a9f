import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from saekit.metrics import reconstruction_metrics
from saekit.sae import (ARCHS, BatchTopKSAE, SAEConfig, SAEConfigError, SparseCode, load_sae, make_sae,
                        Step, TrainOutput, sparse_decode)
from saekit.toy import feature_recovery, make_toy
from saekit.train import TrainConfig, train


@pytest.fixture(scope="module")
def toy():
    """48 features in 16 dims, Poisson(3) of them per sample."""
    return make_toy(n_samples=24_000, d=16, n_features=48, mean_active=3, seed=0, freq_decay=0.0)


@pytest.fixture(scope="module")
def trained(toy):
    """BatchTopK and TopK (k=3, 2x dictionary) trained on the same toy stream, in one run."""
    cfgs = [SAEConfig(arch=a, d_in=16, d_sae=96, k=3, dead_tokens=2000) for a in ("batchtopk", "topk")]
    res = train(toy.x[:20_000], cfgs, TrainConfig(total_tokens=20_000 * 15, batch_size=256, lr=3e-3,
                                                  warmup_steps=20, progress=False))
    return dict(zip(("batchtopk", "topk"), res.saes))


@pytest.mark.parametrize("norm,expect", [(1.0, 1.0), (0.3, 0.3), ("paper", (2 * 16 / 64) ** 0.5)])
def test_encoder_starts_as_scaled_decoder_transpose(norm, expect):
    torch.manual_seed(0)
    sae = make_sae(arch="batchtopk", d_in=16, d_sae=64, k=4, enc_init_norm=norm)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((64,), expect))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t() * expect)
    assert SAEConfig.from_dict(sae.cfg.to_dict()).enc_init_norm == norm


def test_paper_start_norm_is_what_the_papers_init_gives():
    """The BatchTopK paper's code draws W_enc [d_in, d_sae] with torch's kaiming_uniform_ defaults; "paper"
    must be the mean column norm that draw has."""
    torch.manual_seed(0)
    for d_in, d_sae in ((64, 512), (576, 4608), (128, 256)):
        drawn = torch.nn.init.kaiming_uniform_(torch.empty(d_in, d_sae)).norm(dim=0).mean().item()
        assert SAEConfig(d_in=d_in, d_sae=d_sae, enc_init_norm="paper").encoder_start_norm == pytest.approx(drawn, rel=0.02)


@pytest.mark.parametrize("bad", [0, -1.0, "large", None, True])
def test_bad_encoder_start_norm_is_refused(bad):
    with pytest.raises(SAEConfigError, match="enc_init_norm must be a positive number"):
        SAEConfig(enc_init_norm=bad)
    assert SAEConfig().enc_init_norm == "paper"  # the default is the paper's start


def test_batchtopk_batch_mode_has_exact_mean_l0_and_variable_counts():
    torch.manual_seed(0)
    sae = make_sae(arch="batchtopk", d_in=16, d_sae=128, k=7)
    x = torch.randn(64, 16) * torch.rand(64, 1) * 3  # varied norms -> varied counts
    z = sae.encode(x, mode="batch")
    per_token = (z != 0).sum(-1)
    assert int(per_token.sum()) == 64 * 7
    assert per_token.float().std() > 0.5 and per_token.max() > 7 > per_token.min()


def test_topk_has_exactly_k_per_token():
    torch.manual_seed(0)
    sae = make_sae(arch="topk", d_in=16, d_sae=128, k=7)
    z = sae.encode(torch.randn(64, 16))
    assert ((z != 0).sum(-1) == 7).all()


def test_threshold_mode_needs_a_trained_threshold():
    sae = make_sae(arch="batchtopk", d_in=8, d_sae=32, k=2).eval()
    with pytest.raises(SAEConfigError, match="threshold"):
        sae.encode(torch.randn(4, 8))


@pytest.fixture
def sparse_everywhere(monkeypatch):
    """The sparse path at these small test sizes too (saekit picks the dense one below SPARSE_MIN_LATENTS)."""
    import saekit.sae.fast.paths as paths

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)


@pytest.mark.parametrize("n_dead", [10, 40])  # AuxK with every dead latent (<= k_aux) and with its top k_aux
@pytest.mark.parametrize("arch", ["batchtopk", "topk", "matryoshka"])  # Matryoshka: its decode has its own index
def test_fast_sparse_path_matches_dense_gradients(arch, n_dead, sparse_everywhere):
    torch.manual_seed(1)
    cfg = SAEConfig(arch=arch, d_in=24, d_sae=96, k=4, k_aux=16, dead_tokens=10, normalize="none")
    dense, fast = make_sae(cfg), make_sae(cfg)
    fast.load_state_dict(dense.state_dict())
    for s in (dense, fast):
        s.tokens_since_fired[:n_dead] = 100  # dead latents -> AuxK active
    x = torch.randn(48, 24)
    o1, o2 = dense.training_loss(x, fast=False), fast.training_loss(x, fast=True)
    assert float(o1.terms["aux"]) > 0 and (o1.path, o2.path) == ("reference", "sparse")
    torch.testing.assert_close(o1.loss, o2.loss)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(dense.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_auxk_gradients_fold_into_the_sparse_paths_without_a_full_size_zero_tensor(arch, sparse_everywhere, monkeypatch):
    """The fast path's AuxK hands its dead columns' gradients to the sparse encoder's and decoder's backward
    (fast.autograd.DeadColumns), so no [d_sae, d_in] gradient is zero-filled for it and none is added to another; the
    gradients equal those of the plain indexing it replaces (autograd's scatter of the dead rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from saekit.sae.fast import auxk

    class FullSizeZeros(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("zeros", "new_zeros", "zeros_like", "fill_", "zero_") and (
                    tuple(out.shape) == (96, 24)):
                FullSizeZeros.n += 1
            return out

    grads = {}
    for folded in (True, False):
        if not folded:  # the dead rows by plain indexing, their gradients scattered by autograd
            plain = auxk.aux_reconstruction
            monkeypatch.setattr(auxk, "aux_reconstruction", lambda sae, xc, idx, pad, fold=None: plain(sae, xc, idx, pad))
        torch.manual_seed(1)
        sae = make_sae(SAEConfig(arch=arch, d_in=24, d_sae=96, k=4, k_aux=16, dead_tokens=10))
        sae.tokens_since_fired[:40] = 100
        FullSizeZeros.n = 0
        with FullSizeZeros():
            out = sae.training_loss(torch.randn(48, 24))
            out.loss.backward()
        assert out.path == "sparse" and float(out.terms["aux"]) > 0
        grads[folded] = ({n: p.grad.clone() for n, p in sae.named_parameters()}, FullSizeZeros.n)
    assert grads[True][1] == 0 and grads[False][1] >= 2  # W_enc's and W_dec's zero-filled gradients, unfolded
    for n, g in grads[False][0].items():
        torch.testing.assert_close(grads[True][0][n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_auxk_under_cpu_autocast_pads_its_dead_latents_to_a_grid_and_keeps_the_loss(sparse_everywhere):
    """Under bf16 autocast on the CPU the fast path's AuxK pads the dead latents to the slots' grid (a few
    product shapes a run, each a compiled oneDNN kernel) and runs its products in bf16: the padded slots add
    nothing, so loss and gradients match the reference path's (also bf16 there) to bf16 rounding."""
    from saekit.sae.fast import auxk, slots

    sizes = [slots(n, 64, 10**6) for n in range(1, 5000)]
    assert all(0 <= s - n < max(64, n / 8) for n, s in zip(range(1, 5000), sizes))  # <= 12.5% more above 512
    assert len(set(sizes)) < 60 and slots(5000, 64, 4608) == 4608 and slots(0, 64, 4608) == 0
    torch.manual_seed(2)
    cfg = SAEConfig(arch="batchtopk", d_in=24, d_sae=96, k=4, k_aux=16, dead_tokens=10, normalize="none")
    ref, fast = make_sae(cfg), make_sae(cfg)
    fast.load_state_dict(ref.state_dict())
    for s in (ref, fast):
        s.tokens_since_fired[:37] = 100  # 37 dead latents -> 64 slots, 27 of them padding
    x = torch.randn(48, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = auxk.dead_latents(fast, Step(), auxk.padded(fast, Step()))
        assert idx.numel() == 64 and (idx < 0).sum() == 27 and sorted(idx[idx >= 0].tolist()) == list(range(37))
        o1, o2 = ref.training_loss(x, fast=False), fast.training_loss(x)
    assert (o1.path, o2.path) == ("reference", "sparse") and float(o2.terms["aux"]) > 0
    torch.testing.assert_close(o2.terms["aux"], o1.terms["aux"], rtol=2e-2, atol=1e-4)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=5e-2, atol=2e-3, msg=n)


@pytest.mark.parametrize("sync_free", [None, True])
@pytest.mark.parametrize("arch", ["batchtopk", "topk", "matryoshka"])
def test_the_topk_familys_fast_path_selects_positive_entries_without_relu(arch, sync_free, sparse_everywhere):
    """The TopK family's fast path selects from the pre-activations before relu (it keeps positive entries only):
    with most of them negative, fewer than k a row positive on many rows, it gives the reference path's (relu'd)
    code, loss and gradients, with and without read-backs."""
    torch.manual_seed(3)
    cfg = SAEConfig(arch=arch, d_in=24, d_sae=96, k=8, normalize="none", aux_alpha=0,
                    group_sizes=[32, 64] if arch == "matryoshka" else None)
    ref, fast = make_sae(cfg), make_sae(cfg)
    with torch.no_grad():
        ref.b_enc.fill_(-2.5)  # most pre-activations negative
    fast.load_state_dict(ref.state_dict())
    hint = 0.05 if sync_free and ref.has_theta else None  # a hint: the selection without read-backs
    step = Step(sync_free=sync_free, cut_hint=hint)
    x = torch.randn(40, 24)
    assert int((ref.pre_acts(x) > 0).sum(1).lt(8).sum()) > 5  # rows with fewer than k positive pre-activations
    o1, o2 = ref.training_loss(x, fast=False), fast.training_loss(x, step)
    if o2.exact is not None and not bool(o2.exact):  # the trainer would redo it exactly
        o2 = fast.training_loss(x, replace(step, exact=True))
    assert (o1.path, o2.path) == ("reference", "sparse")
    assert torch.equal(o1.l0, o2.l0) and torch.equal(o1.fired, o2.fired)
    torch.testing.assert_close(o2.loss, o1.loss)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-6, rtol=1e-4, msg=n)


def _read_back_counter():
    from readbacks import DispatchReadBacks

    return DispatchReadBacks()


def _exact_and_sync_free(arch: str, n_dead: int, seed: int):
    """Two equal SAEs with n_dead dead latents, and the step that has the second select without read-backs (its
    dead count known)."""
    torch.manual_seed(seed)
    cfg = SAEConfig(arch=arch, d_in=24, d_sae=96, k=4, k_aux=16, dead_tokens=10, normalize="none")
    exact, free = make_sae(cfg), make_sae(cfg)
    free.load_state_dict(exact.state_dict())
    for s in (exact, free):
        s.tokens_since_fired[:n_dead] = 100
    return exact, free, torch.randn(48, 24), Step(sync_free=True, n_dead=n_dead)


def _same_step(exact, free, o1, o2) -> None:
    """The two outputs' loss, code statistics and every gradient are identical, bit for bit."""
    torch.testing.assert_close(o1.loss, o2.loss, rtol=0, atol=0)
    assert torch.equal(o1.l0, o2.l0) and torch.equal(o1.fired, o2.fired)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(exact.named_parameters(), free.named_parameters()):
        assert torch.equal(p1.grad, p2.grad), n


@pytest.mark.parametrize("n_dead", [0, 10, 40])
def test_sync_free_batchtopk_loss_equals_the_exact_one_without_a_read_back(n_dead, sparse_everywhere):
    """BatchTopK's selection without read-backs (hint: 0.9x the previous step's cut; the dead latents' number known
    from the step before) gives the exact path's loss, code and every gradient, flagged exact, and reads nothing
    back; a hint above this batch's cut leaves too few candidates and is flagged."""
    exact, free, x, step = _exact_and_sync_free("batchtopk", n_dead, seed=3)
    o1 = exact.training_loss(x)
    assert o1.exact is None and o1.path == "sparse"  # no previous cut: the exact selection
    step = replace(step, cut_hint=float(o1.cut) * 1.05)  # the previous batch's cut, a little above this one's
    with _read_back_counter() as seen:
        o2 = free.training_loss(x, step)
    assert seen.found == [] and bool(o2.exact) and o2.path == "sparse" and torch.equal(o1.cut, o2.cut)
    assert (float(o1.terms["aux"]) > 0) == (n_dead > 0)
    _same_step(exact, free, o1, o2)
    step = replace(step, cut_hint=float(o1.cut) * 2)  # far above this batch's cut: fewer than B*k candidates
    assert not bool(free.training_loss(x, step).exact)
    assert free.training_loss(x, replace(step, exact=True)).exact is None  # as the Trainer redoes such a step


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_sync_free_thresholded_codes_equal_the_exact_ones_without_a_read_back(arch, sparse_everywhere):
    """JumpReLU and ReLU-L1 find their entries without a read-back, into slots sized by the previous step's density
    (fast.entries): the exact path's loss, code statistics and every gradient, bit for bit, flagged exact, and
    nothing read back; too few slots are flagged, and with Step(exact=True) the entries are found exactly."""
    exact, free, x, step = _exact_and_sync_free(arch, 0, seed=5)
    o1 = exact.training_loss(x)
    assert o1.exact is None and o1.count is None and o1.path == "sparse" and o1.density > 0
    step = replace(step, density_hint=o1.density)  # as the trainer remembers it
    with _read_back_counter() as seen:
        o2 = free.training_loss(x, step)
    n = round(o1.density * x.shape[0] * 96)
    assert seen.found == [] and bool(o2.exact) and o2.path == "sparse" and int(o2.count) == n > 1024
    _same_step(exact, free, o1, o2)
    step = replace(step, density_hint=0.0)  # the fewest slots (1,024): fewer than the entries
    assert not bool(free.training_loss(x, step).exact)
    assert free.training_loss(x, replace(step, exact=True)).exact is None  # as the Trainer redoes such a step


def test_sync_free_topk_selection_equals_the_exact_one_or_says_so(sparse_everywhere):
    """TopK without read-backs keeps all k of every row (the exact selection drops the non-positive ones, a mask the
    host waits for): the same loss and gradients, flagged exact, while every kept value is positive; not otherwise."""
    exact, free, x, step = _exact_and_sync_free("topk", 10, seed=4)
    o1 = exact.training_loss(x)
    with _read_back_counter() as seen:
        o2 = free.training_loss(x, step)
    assert seen.found == [] and bool(o2.exact) and o1.exact is None and o2.path == "sparse"
    _same_step(exact, free, o1, o2)
    with torch.no_grad():
        free.b_enc.fill_(-1.0)  # no positive pre-activation on a zero input: the 4 kept of each row are not positive
    assert not bool(free.training_loss(x[:8] * 0, step).exact)


def test_rectangle_window_is_the_band_around_theta():
    """JumpReLU's window |a - theta| < bandwidth / 2 per latent, as two compares against its bounds (the reference
    and the fast path share it), equals the band computed in float64 wherever an entry is not on its edge."""
    from saekit.sae.architectures.jumprelu import rectangle
    from saekit.sae.fast.select import entries_above

    torch.manual_seed(5)
    a, theta, bw = torch.rand(64, 40) * 3, torch.rand(40) + 1, 0.3
    band = (a.double() - theta.double()).abs() < bw / 2
    edge = ((a.double() - theta.double()).abs() - bw / 2).abs() < 1e-5
    got = rectangle(a, theta, bw)
    assert got.dtype == torch.bool and band.any() and (~band).any()
    assert torch.equal(got[~edge], band[~edge])
    e = entries_above(a, theta - bw / 2)  # one scan finds both sets (the fast path's), row-major; values split them
    v, t = a[e.rows, e.cols], theta[e.cols]
    entries = torch.stack([e.rows, e.cols])
    assert torch.equal(entries[:, rectangle(v, t, bw)], got.nonzero().t())
    assert torch.equal(entries[:, v > t], (a > theta).nonzero().t())
    assert (v > t).any() and rectangle(v, t, bw).any()


def test_entries_found_without_a_read_back_equal_the_exact_ones_or_say_so():
    """entries_above with a capacity: fixed shapes, the entries first (row-major, as the exact ones), then padding
    that repeats the last entry of the matrix and is marked invalid; exact when they all fit, and the count tells
    the next step how many slots to make (entry_slots: 1.25x rounded up on the slots' grid, at least 1,024)."""
    from saekit.sae.fast.select import entries_above, entry_slots

    torch.manual_seed(3)
    a = torch.randn(50, 80)
    exact = entries_above(a, 1.0)
    n = exact.count
    assert exact.valid is None and n == exact.rows.numel() > 0
    for cap in (n, n + 37):
        e = entries_above(a, 1.0, cap)
        assert e.rows.shape == (cap,) and bool(e.exact) and int(e.count) == n and int(e.valid.sum()) == n
        assert torch.equal(e.rows[:n], exact.rows) and torch.equal(e.cols[:n], exact.cols)
        assert bool((e.rows[n:] == 49).all() and (e.cols[n:] == 79).all()) and not e.valid[n:].any()
        assert bool((e.rows[1:] >= e.rows[:-1]).all())  # row-major, padding included
    short = entries_above(a, 1.0, n - 1)
    assert not bool(short.exact) and int(short.count) == n and bool(short.valid.all())
    assert entry_slots(0.0, 4096) == 1024 and entry_slots(0.5, 4096) == 3072 and entry_slots(0.9, 4096) == 4096
    n = 0.002 * 4096 * 24576  # 201,327 entries at the paper's size
    slots = entry_slots(0.002, 4096 * 24576)
    assert slots % 1024 == 0 and 1.25 * n <= slots <= 1.25 * n * 1.125 + 1024
    assert entry_slots(0.002 * 1.01, 4096 * 24576) == slots  # a count that drifts keeps its slots


def _same_loss_and_gradients(cfg, x, setup):
    dense, fast = make_sae(cfg), make_sae(cfg)
    setup(dense)
    fast.load_state_dict(dense.state_dict())
    o1, o2 = dense.training_loss(x, fast=False), fast.training_loss(x, fast=True)
    assert (o1.path, o2.path) == ("reference", "sparse")
    torch.testing.assert_close(o1.loss, o2.loss)
    torch.testing.assert_close(o1.l0, o2.l0)
    assert torch.equal(o1.fired, o2.fired)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(dense.named_parameters(), fast.named_parameters()):
        assert p1.grad is not None and p1.grad.abs().sum() > 0, n
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-4, msg=n)
    return o1


@pytest.mark.parametrize("target", [None, 6.0])  # the paper's L0 penalty and saekit's target-L0 form
def test_jumprelu_fast_path_matches_reference_loss_and_every_gradient(target, sparse_everywhere):
    """Every gradient, the thresholds' included: from the entries selected (a > theta) through the sparse encoder,
    and from the rectangle window around theta (selected or not) through the pseudo-derivatives."""
    torch.manual_seed(2)
    cfg = SAEConfig(arch="jumprelu", d_in=24, d_sae=96, target_l0=target, l0_coeff=0.7, jumprelu_bandwidth=0.4,
                    normalize="none")

    def setup(s):
        with torch.no_grad():
            s.b_enc.fill_(-0.3)
            s.log_threshold.copy_(torch.empty(96).uniform_(0.3, 0.9).log())

    o = _same_loss_and_gradients(cfg, torch.randn(64, 24) * 2, setup)
    assert 0 < float(o.l0.float().mean()) < 30 and float(o.terms["sparsity"]) > 0


def test_relu_fast_path_matches_reference_loss_and_every_gradient(sparse_everywhere):
    torch.manual_seed(3)
    cfg = SAEConfig(arch="relu", d_in=24, d_sae=96, l1_coeff=2.0, normalize="none")

    def setup(s):
        with torch.no_grad():
            s.b_enc.fill_(-1.0)  # a sparse code, as after the L1 penalty has worked

    o = _same_loss_and_gradients(cfg, torch.randn(64, 24), setup)
    assert 0 < float(o.l0.float().mean()) < 30 and float(o.terms["sparsity"]) > 0


def test_the_path_is_chosen_by_size_and_density():
    """Where the sparse kernels do not pay (a small dictionary, or a dense code such as a fresh ReLU SAE's) the fast
    path hands over to the reference path, so the choice never costs more than the dense step."""
    from saekit.sae.fast.paths import SPARSE_MAX_DENSITY, SPARSE_MIN_LATENTS

    x = torch.randn(32, 24)
    big = SPARSE_MIN_LATENTS * 2
    assert make_sae(arch="topk", d_in=24, d_sae=SPARSE_MIN_LATENTS // 2, k=2).training_loss(x).path == "reference"
    assert make_sae(arch="topk", d_in=24, d_sae=big, k=2).training_loss(x).path == "sparse"
    k_dense = int(SPARSE_MAX_DENSITY * big) + 8
    assert make_sae(arch="topk", d_in=24, d_sae=big, k=k_dense).training_loss(x).path == "reference"
    relu = make_sae(arch="relu", d_in=24, d_sae=big, normalize="none")
    with torch.no_grad():
        relu.b_enc.fill_(5.0)  # every entry active
    assert relu.training_loss(x).path == "reference"
    with torch.no_grad():
        relu.b_enc.fill_(-2.0)  # a sparse code (about 1% of entries)
    out = relu.training_loss(x * 4)
    assert out.path == "sparse" and 0 < float(out.l0.float().mean()) < SPARSE_MAX_DENSITY * big


def test_sparse_decode_equals_dense_product():
    torch.manual_seed(0)
    W = torch.randn(50, 8)
    z = torch.relu(torch.randn(6, 50) - 1.0)
    z[3] = 0  # a token with no active latent
    r, c = z.nonzero(as_tuple=True)
    code = SparseCode(r, c, z[r, c], z.shape)
    torch.testing.assert_close(sparse_decode(code, W), z @ W)
    torch.testing.assert_close(code.dense(), z)


@pytest.mark.parametrize("shuffled", [False, True])  # row-major entries (a selection's) and any order
def test_sparse_decode_gradients_equal_the_dense_products(shuffled):
    torch.manual_seed(0)
    z = torch.relu(torch.randn(7, 40) - 1.0)
    z[2] = 0  # a token with no active latent
    z[:, 5] = 0  # a latent that no token uses
    r, c = z.nonzero(as_tuple=True)
    if shuffled:
        perm = torch.randperm(r.numel())
        r, c = r[perm], c[perm]
    W1 = torch.randn(40, 8, requires_grad=True)
    W2 = W1.detach().clone().requires_grad_(True)
    vals = z[r, c].clone().requires_grad_(True)
    zd = z.clone().requires_grad_(True)
    g = torch.randn(7, 8)
    (sparse_decode(SparseCode(r, c, vals, z.shape), W1) * g).sum().backward()
    (zd @ W2 * g).sum().backward()
    torch.testing.assert_close(W1.grad, W2.grad)
    torch.testing.assert_close(vals.grad, zd.grad[r, c])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_selection_is_row_major(arch):
    """The sparse kernels group a selection's entries by row without sorting them: every select keeps rows in
    order (BatchTopK's batch top-k comes out of topk in no order and is sorted)."""
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


def test_decoder_rows_stay_unit_norm(trained):
    for sae in trained.values():
        norms = sae.W_dec.norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_toy_features_are_recovered(trained, toy):
    """A true feature counts as found when a decoder row has cosine >= 0.9 with it. Two random unit
    vectors in 16 dims reach 0.9 with probability ~1e-7, so 96 rows find none by chance; measured
    here: 0.75-0.88 of the features for BatchTopK and ~0.75 for TopK over three seeds."""
    for arch, sae in trained.items():
        rec = feature_recovery(sae.W_dec, toy.features, threshold=0.9)
        assert rec["recovered"] >= 0.65, (arch, rec["recovered"])
        assert rec["mmcs"] >= 0.9, (arch, rec["mmcs"])
    chance = feature_recovery(torch.randn(96, 16), toy.features, threshold=0.9)
    assert chance["recovered"] == 0.0 and chance["mmcs"] < 0.8


def test_batchtopk_count_follows_true_feature_count_and_topk_cannot(trained, toy):
    x, n_true = toy.x[20_000:], toy.n_active[20_000:].float()  # held out
    bt = (trained["batchtopk"].encode(x) != 0).sum(-1).float()
    tk = (trained["topk"].encode(x) != 0).sum(-1).float()
    corr = torch.corrcoef(torch.stack([bt, n_true]))[0, 1]
    assert corr > 0.45, float(corr)  # measured ~0.57 over three seeds
    assert tk.std() == 0  # TopK: every sample gets k, whatever its true count


def test_threshold_mode_l0_matches_batch_mode_on_held_out(trained, toy):
    sae = trained["batchtopk"]
    held = toy.x[20_000:]
    thr = reconstruction_metrics(sae, held.split(1000), mode="threshold")
    bat = reconstruction_metrics(sae, held.split(1000), mode="batch")
    assert bat["l0"] == pytest.approx(3.0)
    assert thr["l0"] == pytest.approx(bat["l0"], rel=0.05)
    assert thr["nmse"] < 0.25


@pytest.mark.parametrize("start,revived_below", [(1.0, 0.2), ("paper", 0.4)])
def test_auxk_revives_dead_latents(toy, start, revived_below):
    """Kill half the dictionary (encoder bias far negative); with AuxK the dead fraction falls, without it it stays.
    Measured (150 steps): start 1: 0.49 -> 0.12 with AuxK, 0.50 -> 0.46 without; the paper's start (0.5 here):
    0.50 -> 0.31 with, 0.52 -> 0.52 without (smaller starts revive fewer on this toy: 128 latents, 48 features)."""
    def run(alpha):
        cfg = SAEConfig(arch="topk", d_in=16, d_sae=128, k=3, dead_tokens=512, aux_alpha=alpha, k_aux=64,
                        enc_init_norm=start)
        from saekit.train import Trainer

        t = Trainer([cfg], TrainConfig(total_tokens=256 * 150, batch_size=256, lr=3e-3, warmup_steps=5,
                                       progress=False, calibrate_batches=0))
        t.initialise(toy.x[:4096])
        with torch.no_grad():
            t.saes[0].b_enc[64:] = -2.0 * cfg.encoder_start_norm  # pre-activations scale with the start norm
        res = t.fit(toy.x[:20_000])
        return res.logs[0]

    with_aux, without = run(1 / 32), run(0.0)
    assert with_aux["dead_frac"].max() >= 0.4  # the latents were dead at some point
    assert with_aux["dead_frac"].iloc[-1] < revived_below, with_aux["dead_frac"].iloc[-1]
    assert without["dead_frac"].iloc[-1] > 0.4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("normalize", ["none", "token", "dataset"])
def test_save_load_round_trip(arch, normalize, tmp_path):
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, d_in=16, d_sae=64, k=4, normalize=normalize, hook_name="resid_post.3",
                    model_name="m", target_l0=4 if arch == "jumprelu" else None)
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.input_scale.fill_(0.37)
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.05)
            sae.threshold_updates.fill_(10)
    sae.eval()
    x = torch.randn(20, 16) * 3
    z1, xh1 = sae(x)
    sae.save(tmp_path / "s")
    cfg_json = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg_json["metadata"]["hook_name"] == "resid_post.3" and cfg_json["d_sae"] == 64
    expected = {"batchtopk": "jumprelu", "jumprelu": "jumprelu", "topk": "topk", "relu": "standard",
                "matryoshka": "jumprelu"}[arch]
    assert cfg_json["architecture"] == expected
    loaded = load_sae(tmp_path / "s")
    assert type(loaded) is type(sae)
    z2, xh2 = loaded(x)
    torch.testing.assert_close(xh1, xh2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)


def test_loads_saelens_style_folder(tmp_path):
    """A folder laid out as SAELens writes it (jumprelu with a per-latent threshold)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d, f = 12, 40
    w = {"W_enc": torch.randn(d, f), "W_dec": torch.randn(f, d), "b_enc": torch.randn(f) * 0.1,
         "b_dec": torch.randn(d) * 0.1, "threshold": torch.rand(f) * 0.5}
    (tmp_path / "x").mkdir()
    save_file(w, str(tmp_path / "x" / "sae_weights.safetensors"))
    (tmp_path / "x" / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d, "d_sae": f,
                                                         "normalize_activations": "none",
                                                         "metadata": {"hook_name": "blocks.3.hook_resid_post"}}))
    sae = load_sae(tmp_path / "x")
    x = torch.randn(7, d)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z_ref = torch.relu(pre) * (pre > w["threshold"])
    torch.testing.assert_close(sae.encode(x), z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x).x_hat, z_ref @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"


def test_bad_sae_inputs_and_files(tmp_path):
    with pytest.raises(SAEConfigError, match="k must satisfy"):
        SAEConfig(arch="batchtopk", d_in=8, d_sae=16, k=16)
    with pytest.raises(SAEConfigError, match="unknown architecture"):
        SAEConfig(arch="gated")
    sae = make_sae(arch="topk", d_in=8, d_sae=32, k=2)
    with pytest.raises(SAEConfigError, match="d_in=8"):
        sae.encode(torch.randn(3, 9))
    with pytest.raises(SAEConfigError, match="floating point"):
        sae.encode(torch.ones(3, 8, dtype=torch.long))
    sae.save(tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEConfigError, match="corrupt"):
        load_sae(tmp_path / "s")
    with pytest.raises(SAEConfigError, match="not an SAE folder"):
        load_sae(tmp_path / "nothing")


def test_candidate_batch_topk_is_exact():
    from saekit.sae import batch_topk

    torch.manual_seed(0)
    a = torch.relu(torch.randn(64, 300))
    n = 64 * 5
    ref_vals, ref_idx = a.reshape(-1).topk(n)
    # 2.5 and 50 leave fewer than n candidates: full top-k fallback; a tensor hint stays on the device
    for hint in (0.0, 0.5, 1.0, 2.5, 50.0, torch.tensor(0.0), torch.tensor(1.0), torch.tensor(50.0)):
        vals, idx = batch_topk(a, n, hint)
        assert set(idx.tolist()) == set(ref_idx.tolist()), hint
        torch.testing.assert_close(vals.sort().values, ref_vals.sort().values)


def test_static_batch_topk_is_exact_or_says_so():
    """batch_topk_static: fixed shapes, no read-back; exact (the same entries and values as a full top-k) whenever
    between n and `capacity` entries pass the hint, and flagged otherwise (too few, or too many to hold)."""
    from saekit.sae.fast.select import batch_topk_static

    torch.manual_seed(0)
    a = torch.relu(torch.randn(64, 300))
    n = 64 * 5
    ref_vals, ref_idx = a.reshape(-1).topk(n)
    seen = set()
    for factor in (0.0, 0.5, 0.9, 1.0, 1.2):
        hint = ref_vals.min() * factor
        count = int((a > hint).sum())
        for capacity in {n, 2 * n, 3 * n, max(n, count), max(n, count - 1)}:
            vals, idx, exact = batch_topk_static(a, n, hint, capacity)
            assert vals.shape == idx.shape == (n,) and exact.dtype == torch.bool and exact.dim() == 0
            assert bool(exact) == (n <= count <= capacity), (factor, capacity, count)
            seen.add(bool(exact))
            if exact:
                assert set(idx.tolist()) == set(ref_idx.tolist()), (factor, capacity)
                torch.testing.assert_close(vals.sort().values, ref_vals.sort().values)
            assert int(idx.min()) >= 0 and int(idx.max()) < a.numel()  # even when not exact: valid indices
    assert seen == {True, False}
    with pytest.raises(ValueError, match="capacity"):
        batch_topk_static(a, n, ref_vals.min(), n - 1)


def test_dead_latents_whose_number_is_known_are_found_without_a_read_back():
    """The fast path's AuxK takes the number of dead latents the step says (the trainer's one read-back of the step
    before): no read-back of its own; where the step does not know it, it is read back."""
    from saekit.sae.fast import auxk

    sae = make_sae(arch="batchtopk", d_in=8, d_sae=64, k=2, dead_tokens=10)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[::3] = True
    since, n_dead = sae.next_dead_counters(fired, 20)
    assert int(n_dead) == 64 - 22 and int(sae.tokens_since_fired.sum()) == 0  # the counters are left alone
    sae.tokens_since_fired.copy_(since)
    step = Step(n_dead=int(n_dead))
    with _read_back_counter() as seen:
        dead = auxk.dead_latents(sae, step, pad=False)
    assert seen.found == [] and torch.equal(dead, (~fired).nonzero().squeeze(1))
    sae.tokens_since_fired[:6] = 0  # changed by hand, and the step does not know the number
    with _read_back_counter() as seen:
        dead = auxk.dead_latents(sae, Step(), pad=False)
    assert len(seen.found) == 1 and "nonzero" in seen.found[0]
    assert torch.equal(dead, sae.dead_mask().nonzero().squeeze(1)) and dead.numel() == 64 - 22 - 4
    assert auxk.dead_latents(sae, Step(n_dead=0), pad=False) is None
    assert auxk.dead_latents(sae, Step(aux=False), pad=False) is None


@pytest.mark.parametrize("bad", ["large", "-1", "0"])
def test_bad_encoder_start_flag_is_refused_by_the_cli(bad, capsys):
    from saekit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--store", "s", "--out", "o", "--enc-init-norm", bad])
    assert "enc-init-norm must be 'paper' or a positive number" in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--store", "s", "--out", "o", "--enc-init-norm", "0.7"]).enc_init_norm == 0.7


@pytest.mark.parametrize("input_grad,centred", [(False, False), (True, False), (False, True)])
def test_sparse_encode_gradients_equal_the_dense_products(input_grad, centred):
    """SparseEncode's gradients of W_enc, b_enc and b_dec (b_dec's as -W_enc times the column sums of the values'
    gradient) and, when the input asks for one, of the input, against autograd through the dense encode; also
    given x - b_dec made by the caller (differentiable to b_dec, as fast.paths.centred_pre_acts makes it): no gradient
    goes through it, so b_dec's is counted once."""
    from saekit.sae.fast.autograd import CodeIndex, sparse_encode

    torch.manual_seed(0)
    B, d, f = 9, 6, 30
    x = torch.randn(B, d, requires_grad=input_grad)
    W_enc, b_enc, b_dec = torch.randn(d, f), torch.randn(f), torch.randn(d)
    params = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, b_dec)]
    dense = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, b_dec)]
    a = torch.relu((x.detach() - b_dec) @ W_enc + b_enc)
    r, c = (a > 1.0).nonzero(as_tuple=True)  # row-major entries, some rows without any
    g = torch.randn(r.numel())
    xc = x - params[2] if centred else None
    (sparse_encode(x, *params, CodeIndex(r, c, B, f, rows_sorted=True), a, xc).vals * g).sum().backward()
    x_grad = x.grad.clone() if input_grad else None
    if input_grad:
        x.grad = None
    ad = torch.relu((x - dense[2]) @ dense[0] + dense[1])
    (ad[r, c] * g).sum().backward()
    for p1, p2, name in zip(params, dense, ("W_enc", "b_enc", "b_dec")):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
    if input_grad:
        torch.testing.assert_close(x_grad, x.grad)


@pytest.mark.parametrize("rows_sorted", [True, False])
def test_code_index_counts_each_rows_entries(rows_sorted):
    """CodeIndex's row bounds: the offsets embedding_bag reads and, from the same search, each row's number of
    entries (a sparse path's l0 per token), rows without entries included; the shared aranges are arange's."""
    from saekit.sae.fast.index import CodeIndex, arange

    torch.manual_seed(0)
    rows = torch.tensor([0, 0, 2, 2, 2, 5, 6, 6])
    cols = torch.randint(0, 30, (8,))
    if not rows_sorted:
        perm = torch.randperm(8)
        rows, cols = rows[perm], cols[perm]
    index = CodeIndex(rows, cols, 8, 30, rows_sorted=rows_sorted)
    assert index.row_counts().tolist() == torch.bincount(rows, minlength=8).tolist() == [2, 0, 3, 0, 0, 1, 2, 0]
    assert index.row_offsets.tolist() == [0, 2, 2, 5, 5, 5, 6, 8]
    assert arange(9, rows.device) is arange(9, rows.device) and arange(9, rows.device).tolist() == list(range(9))


def test_the_fast_path_centres_its_input_once(sparse_everywhere):
    """x - b_dec, read by the dense encode, the sparse encoder's backward and AuxK, is computed once a step (each
    subtraction of [batch, d_in] by [d_in] is a kernel launch that a GPU's host-bound step pays for)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Subs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.sub.Tensor and [tuple(a.shape) for a in args[:2]] == [(64, 16), (16,)]:
                Subs.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=1))
    sae.tokens_since_fired[:40] = 10  # dead: AuxK runs
    x = torch.randn(64, 16)
    with Subs():
        out = sae.training_loss(x, Step(cut_hint=0.1))
        out.loss.backward()
    assert out.path == "sparse" and float(out.terms["aux"]) > 0 and Subs.n == 1
    assert sae.b_dec.grad is not None and bool(sae.b_dec.grad.abs().sum() > 0)


def test_sparse_kernels_under_bf16_autocast_give_fp32_gradients():
    """Under autocast the encoder's values come from bf16 products; the sparse kernels' gradients still come back in
    the parameters' fp32, within bf16 rounding of the gradients of the same code in fp32."""
    from saekit.sae.fast.autograd import CodeIndex, sparse_encode

    torch.manual_seed(0)
    B, d, f = 16, 32, 96
    x = torch.randn(B, d)
    base = [torch.randn(d, f) * 0.3, torch.randn(f) * 0.1, torch.randn(d) * 0.1, torch.randn(f, d) * 0.3]
    r, c = (torch.relu((x - base[2]) @ base[0] + base[1]) > 0.8).nonzero(as_tuple=True)  # the same entries in both
    grads = {}
    for low in (False, True):
        W_enc, b_enc, b_dec, W_dec = [t.clone().requires_grad_(True) for t in base]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            a = torch.relu((x - b_dec.detach()) @ W_enc.detach() + b_enc.detach())  # bf16 under autocast
            code = sparse_encode(x, W_enc, b_enc, b_dec, CodeIndex(r, c, B, f, rows_sorted=True), a)
            out = sparse_decode(code, W_dec)
        (out.float() - x).pow(2).mean().backward()
        grads[low] = [t.grad for t in (W_enc, b_enc, b_dec, W_dec)] + [code.vals.detach()]
    assert not torch.equal(grads[False][4], grads[True][4])  # the values did come from bf16 products
    for g32, g16, name in zip(grads[False], grads[True], ("W_enc", "b_enc", "b_dec", "W_dec")):
        assert g16.dtype == torch.float32, name
        assert (g16 - g32).norm() / g32.norm() < 0.02, name


def test_decoder_gradient_loses_only_its_component_along_each_row():
    torch.manual_seed(0)
    sae = make_sae(arch="batchtopk", d_in=12, d_sae=40, k=3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1) + 0.5)  # rows of several norms: the projection divides by |w|^2
    g = torch.randn(40, 12)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grad()
    W = sae.W_dec.detach()
    along = (g * W).sum(-1, keepdim=True) / (W * W).sum(-1, keepdim=True) * W
    torch.testing.assert_close(sae.W_dec.grad, g - along)
    assert float((sae.W_dec.grad * W).sum(-1).abs().max()) < 1e-5


def test_theta_is_the_mean_of_the_first_cuts_then_a_moving_average():
    """BatchTopK's training theta: the plain mean of the first 1 / (1 - threshold_beta) cuts, then an exponential
    moving average with weight 1 - threshold_beta on each new cut (one update per training step, on the device)."""
    import numpy as np

    from saekit.sae.theta import running_update

    sae = make_sae(arch="batchtopk", d_in=8, d_sae=32, k=2, threshold_beta=0.9)
    cuts = np.random.default_rng(0).uniform(0.5, 2.0, 25)
    expect = []
    for n, c in enumerate(cuts, 1):
        running_update(sae.threshold, sae.threshold_updates, torch.tensor(c, dtype=torch.float32), 0.9)
        w = max(0.1, 1 / n)
        expect.append(c if n == 1 else expect[-1] + w * (c - expect[-1]))
        assert abs(float(sae.threshold) - expect[-1]) < 1e-5 * expect[-1]
        assert int(sae.threshold_updates) == n
    assert abs(expect[9] - cuts[:10].mean()) < 1e-9  # the first 10 (= 1 / (1 - 0.9)): their mean
    assert sae.threshold.dtype == torch.float32
    # a cut from a bf16 selection (autocast), as after_step gives it
    sae.after_step(TrainOutput(*[None] * 6, cut=torch.tensor(3.0, dtype=torch.bfloat16)))
    assert sae.threshold.dtype == torch.float32 and float(sae.threshold) > expect[-1]


def test_theta_estimates_are_the_batch_cut_averaged_or_pooled():
    """saekit.sae.theta.estimate: per batch, the smallest of the top B*k pre-activations, averaged over batches;
    pooled over n tokens, a value that gives exactly that mean L0 in threshold mode."""
    from saekit.sae.theta import batch_cut, estimate

    torch.manual_seed(0)
    sae = make_sae(arch="batchtopk", d_in=8, d_sae=32, k=3)
    xs = [torch.randn(20, 8) for _ in range(4)]
    cuts = [sae.pre_acts(sae.prepare(x)).detach().flatten().topk(60).values.min() for x in xs]
    mean, n = estimate(sae, xs, 3)
    assert n == 4 and abs(mean - float(torch.stack(cuts).mean())) < 1e-6
    assert torch.equal(batch_cut(sae.pre_acts(sae.prepare(xs[0])), 3), cuts[0])
    pooled, n = estimate(sae, xs, 3, n_tokens=80)
    a = torch.cat([sae.pre_acts(sae.prepare(x)) for x in xs])
    assert n == 80 and int((a > pooled).sum()) == 240
