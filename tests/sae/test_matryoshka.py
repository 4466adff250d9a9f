"""Matryoshka BatchTopK: nested prefixes that each reconstruct, on toy data with a feature
hierarchy."""

import json

import pytest
import torch

from saekit.metrics import reconstruction_metrics
from saekit.sae import SAEConfig, SAEConfigError, load_sae, make_sae
from saekit.toy import feature_recovery, make_hierarchical_toy
from saekit.train import TrainConfig, train

COMMON = dict(d_in=32, d_sae=64, k=3, dead_tokens=500, normalize="none")


@pytest.fixture(scope="module")
def trained():
    toy = make_hierarchical_toy(n_samples=12000, d=32, n_parents=8, children_per_parent=6, seed=0)
    cfgs = [
        SAEConfig(arch="matryoshka", group_sizes=[8, 8, 16, 32], **COMMON),
        SAEConfig(arch="batchtopk", **COMMON),
    ]
    res = train(
        toy.x,
        cfgs,
        TrainConfig(
            total_tokens=256 * 400, batch_size=256, lr=3e-3, warmup_steps=10, progress=False
        ),
    )
    return toy, res.saes[0], res.saes[1]


def test_each_prefix_reconstructs_and_error_falls_as_it_grows(trained):
    toy, mat, bt = trained
    x = toy.x[:4000]
    nmse = [reconstruction_metrics(mat.prefix(g), [x])["nmse"] for g in range(1, 5)]
    assert all(a > b for a, b in zip(nmse, nmse[1:])), nmse
    assert nmse[-1] == pytest.approx(reconstruction_metrics(mat, [x])["nmse"], rel=1e-6)
    # the nested loss is what makes a small prefix useful: a plain BatchTopK's
    # first 8 latents are not
    plain = reconstruction_metrics(bt.first_latents(8), [x])["nmse"]
    assert nmse[0] < 0.5 * plain, (nmse[0], plain)
    # and the first group holds the parents (the frequent, general features)
    parents = toy.features[:8]
    assert (
        feature_recovery(mat.W_dec[:8], parents)["mmcs"]
        > feature_recovery(bt.W_dec[:8], parents)["mmcs"]
    )


def test_batch_mode_l0_is_k_and_prefix_codes_are_restrictions(trained):
    toy, mat, _ = trained
    x = toy.x[:1024]
    with torch.no_grad():
        z, _ = mat(x, mode="batch")
        assert (z != 0).sum(-1).float().mean().item() == pytest.approx(3.0)
        full, _ = mat(x)  # threshold mode
        sub, _ = mat.prefix(2)(x)
    assert torch.equal(sub, full[:, :16])
    assert mat.group_of(torch.tensor([0, 7, 8, 15, 16, 63])).tolist() == [0, 0, 1, 1, 2, 3]


def test_save_load_round_trip_keeps_groups(trained, tmp_path):
    toy, mat, _ = trained
    mat.save(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert raw["architecture"] == "jumprelu" and raw["matryoshka_widths"] == [8, 16, 32, 64]
    back = load_sae(tmp_path / "m")
    assert (
        back.cfg.arch == "matryoshka"
        and back.cfg.group_sizes == [8, 8, 16, 32]
        and back.widths == mat.widths
    )
    with torch.no_grad():
        assert torch.allclose(back(toy.x[:256]).x_hat, mat(toy.x[:256]).x_hat, atol=1e-5)


def test_group_sizes_as_fractions_and_clear_errors():
    cfg = SAEConfig(arch="matryoshka", d_in=8, d_sae=4608, k=4)
    # default: prefixes 1/16, 1/8, 1/4, 1/2, all
    assert cfg.group_sizes == [288, 288, 576, 1152, 2304]
    assert SAEConfig(
        arch="matryoshka", d_in=8, d_sae=100, k=4, group_sizes=[0.25, 0.75]
    ).group_sizes == [25, 75]
    with pytest.raises(SAEConfigError, match="sum to 60, not d_sae=64"):
        SAEConfig(arch="matryoshka", d_in=8, d_sae=64, k=4, group_sizes=[20, 40])
    with pytest.raises(SAEConfigError, match="sum to 0.9, not 1"):
        SAEConfig(arch="matryoshka", d_in=8, d_sae=64, k=4, group_sizes=[0.5, 0.4])
    with pytest.raises(SAEConfigError, match="one weight per group"):
        SAEConfig(
            arch="matryoshka", d_in=8, d_sae=64, k=4, group_sizes=[32, 32], group_weights=[1.0]
        )
    with pytest.raises(SAEConfigError, match="n_groups"):
        make_sae(SAEConfig(arch="matryoshka", d_in=8, d_sae=64, k=4, group_sizes=[32, 32])).prefix(
            3
        )


def test_fast_and_dense_losses_agree(monkeypatch):
    """The sparse path (forced at this size) gives the dense path's loss and every gradient, and
    decodes its code
    once: one embedding_bag gives every prefix's reconstruction and the whole one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import saekit.sae.fast.paths as paths

    class Bags(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Bags.n += "embedding_bag" in func.__name__
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="matryoshka", group_sizes=[8, 8, 16, 32], **COMMON))
    x = torch.randn(128, 32)
    with Bags():
        fast = sae.training_loss(x, fast=True)
    dense = sae.training_loss(x, fast=False)
    assert (fast.path, dense.path, Bags.n) == ("sparse", "reference", 1)
    assert fast.loss.item() == pytest.approx(dense.loss.item(), rel=1e-5)
    grads = []
    for out in (fast, dense):
        sae.zero_grad()
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, atol=1e-6, rtol=1e-4, msg=n)
