from dataclasses import replace

import pytest
import torch

from saekit.sae import (
    SAEConfig,
    Step,
    make_sae,
)
from saekit.sae.fast import Plan, training_loss


# AuxK with every dead latent (<= k_aux) and with its top k_aux
@pytest.mark.parametrize("n_dead", [10, 40])
# Matryoshka: its decode has its own index
@pytest.mark.parametrize("arch", ["batchtopk", "topk", "matryoshka"])
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
def test_auxk_gradients_fold_into_the_sparse_paths_without_a_full_size_zero_tensor(
    arch, sparse_everywhere, monkeypatch
):
    """The fast path's AuxK hands its dead columns' gradients to the sparse encoder's and decoder's
    backward (fast.autograd.DeadColumns), so no [d_sae, d_in] gradient is zero-filled for it and
    none is added to another; the gradients equal those of the plain indexing it replaces
    (autograd's scatter of the dead rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from saekit.sae.fast import auxk

    class FullSizeZeros(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in (
                "zeros",
                "new_zeros",
                "zeros_like",
                "fill_",
                "zero_",
            ) and (tuple(out.shape) == (96, 24)):
                FullSizeZeros.n += 1
            return out

    grads = {}
    for folded in (True, False):
        if not folded:  # the dead rows by plain indexing, their gradients scattered by autograd
            plain = auxk.aux_reconstruction
            monkeypatch.setattr(
                auxk,
                "aux_reconstruction",
                lambda sae, xc, idx, pad, fold=None, plain=plain: plain(sae, xc, idx, pad),
            )
        torch.manual_seed(1)
        sae = make_sae(SAEConfig(arch=arch, d_in=24, d_sae=96, k=4, k_aux=16, dead_tokens=10))
        sae.tokens_since_fired[:40] = 100
        FullSizeZeros.n = 0
        with FullSizeZeros():
            out = sae.training_loss(torch.randn(48, 24))
            out.loss.backward()
        assert out.path == "sparse" and float(out.terms["aux"]) > 0
        grads[folded] = ({n: p.grad.clone() for n, p in sae.named_parameters()}, FullSizeZeros.n)
    # W_enc's and W_dec's zero-filled gradients, unfolded
    assert grads[True][1] == 0 and grads[False][1] >= 2
    for n, g in grads[False][0].items():
        torch.testing.assert_close(grads[True][0][n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_auxk_under_cpu_autocast_pads_its_dead_latents_to_a_grid_and_keeps_the_loss(
    sparse_everywhere,
):
    """Under bf16 autocast on the CPU the fast path's AuxK pads the dead latents to the slots' grid
    (a few product shapes a run, each a compiled oneDNN kernel) and runs its products in bf16: the
    padded slots add nothing, so loss and gradients match the reference path's (also bf16 there)
    to bf16 rounding."""
    from saekit.sae.fast import auxk, slots

    sizes = [slots(n, 64, 10**6) for n in range(1, 5000)]
    # <= 12.5% more above 512
    assert all(0 <= s - n < max(64, n / 8) for n, s in zip(range(1, 5000), sizes))
    assert len(set(sizes)) < 60 and slots(5000, 64, 4608) == 4608 and slots(0, 64, 4608) == 0
    torch.manual_seed(2)
    cfg = SAEConfig(
        arch="batchtopk", d_in=24, d_sae=96, k=4, k_aux=16, dead_tokens=10, normalize="none"
    )
    ref, fast = make_sae(cfg), make_sae(cfg)
    fast.load_state_dict(ref.state_dict())
    for s in (ref, fast):
        s.tokens_since_fired[:37] = 100  # 37 dead latents -> 64 slots, 27 of them padding
    x = torch.randn(48, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx = auxk.dead_latents(fast, Step(), Plan(), auxk.padded(fast, Plan()))
        assert (
            idx.numel() == 64
            and (idx < 0).sum() == 27
            and sorted(idx[idx >= 0].tolist()) == list(range(37))
        )
        o1, o2 = ref.training_loss(x, fast=False), fast.training_loss(x)
    assert (o1.path, o2.path) == ("reference", "sparse") and float(o2.terms["aux"]) > 0
    torch.testing.assert_close(o2.terms["aux"], o1.terms["aux"], rtol=2e-2, atol=1e-4)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=5e-2, atol=2e-3, msg=n)


@pytest.mark.parametrize("sync_free", [None, True])
@pytest.mark.parametrize("arch", ["batchtopk", "topk", "matryoshka"])
def test_the_topk_familys_fast_path_selects_positive_entries_without_relu(
    arch, sync_free, sparse_everywhere
):
    """The TopK family's fast path selects from the pre-activations before relu (it keeps positive
    entries only): with most of them negative, fewer than k a row positive on many rows, it gives
    the reference path's (relu'd) code, loss and gradients, with and without read-backs."""
    torch.manual_seed(3)
    cfg = SAEConfig(
        arch=arch,
        d_in=24,
        d_sae=96,
        k=8,
        normalize="none",
        aux_alpha=0,
        group_sizes=[32, 64] if arch == "matryoshka" else None,
    )
    ref, fast = make_sae(cfg), make_sae(cfg)
    with torch.no_grad():
        ref.b_enc.fill_(-2.5)  # most pre-activations negative
    fast.load_state_dict(ref.state_dict())
    hint = 0.05 if sync_free and ref.has_theta else None  # a hint: the selection without read-backs
    plan = Plan(sync_free=sync_free, cut_hint=hint)
    x = torch.randn(40, 24)
    # rows with fewer than k positive pre-activations
    assert int((ref.pre_acts(x) > 0).sum(1).lt(8).sum()) > 5
    o1, o2 = ref.training_loss(x, fast=False), training_loss(fast, x, plan=plan)
    if o2.exact is not None and not bool(o2.exact):  # the trainer would redo it exactly
        o2 = training_loss(fast, x, plan=replace(plan, exact=True))
    assert (o1.path, o2.path) == ("reference", "sparse")
    assert torch.equal(o1.l0, o2.l0) and torch.equal(o1.fired, o2.fired)
    torch.testing.assert_close(o2.loss, o1.loss)
    o1.loss.backward()
    o2.loss.backward()
    for (n, p1), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-6, rtol=1e-4, msg=n)


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


# the paper's L0 penalty and saekit's target-L0 form
@pytest.mark.parametrize("target", [None, 6.0])
def test_jumprelu_fast_path_matches_reference_loss_and_every_gradient(target, sparse_everywhere):
    """Every gradient, the thresholds' included: from the entries selected (a > theta) through the
    sparse encoder, and from the rectangle window around theta (selected or not) through the
    pseudo-derivatives."""
    torch.manual_seed(2)
    cfg = SAEConfig(
        arch="jumprelu",
        d_in=24,
        d_sae=96,
        target_l0=target,
        l0_coeff=0.7,
        jumprelu_bandwidth=0.4,
        normalize="none",
    )

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
    """Where the sparse kernels do not pay (a small dictionary, or a dense code such as a fresh ReLU
    SAE's) the fast path hands over to the reference path, so the choice never costs more than
    the dense step."""
    from saekit.sae.fast.paths import SPARSE_MAX_DENSITY, SPARSE_MIN_LATENTS

    x = torch.randn(32, 24)
    big = SPARSE_MIN_LATENTS * 2
    assert (
        make_sae(arch="topk", d_in=24, d_sae=SPARSE_MIN_LATENTS // 2, k=2).training_loss(x).path
        == "reference"
    )
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


def test_the_fast_path_centres_its_input_once(sparse_everywhere):
    """x - b_dec, read by the dense encode, the sparse encoder's backward and AuxK, is computed once
    a step (each subtraction of [batch, d_in] by [d_in] is a kernel launch that a GPU's
    host-bound step pays for)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Subs(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.sub.Tensor and [tuple(a.shape) for a in args[:2]] == [
                (64, 16),
                (16,),
            ]:
                Subs.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=1))
    sae.tokens_since_fired[:40] = 10  # dead: AuxK runs
    x = torch.randn(64, 16)
    with Subs():
        out = training_loss(sae, x, plan=Plan(cut_hint=0.1))
        out.loss.backward()
    assert out.path == "sparse" and float(out.terms["aux"]) > 0 and Subs.n == 1
    assert sae.b_dec.grad is not None and bool(sae.b_dec.grad.abs().sum() > 0)
