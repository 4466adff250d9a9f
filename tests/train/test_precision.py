import pytest
import torch

from saekit.sae import SAEConfig
from saekit.toy import make_toy
from saekit.train import TrainConfig, train


@pytest.fixture(scope="module")
def toy_x():
    return make_toy(n_samples=6000, d=16, n_features=48, mean_active=3, seed=1).x


def test_bf16_autocast_trains(toy_x):
    """The mixed-precision path (bf16 autocast, fp32 master weights) runs and learns, here on
    CPU."""
    cfgs = [
        SAEConfig(arch=a, d_in=16, d_sae=64, k=3, target_l0=3)
        for a in ("batchtopk", "topk", "jumprelu")
    ]
    res = train(
        toy_x,
        cfgs,
        TrainConfig(
            total_tokens=128 * 40,
            batch_size=128,
            lr=3e-3,
            warmup_steps=2,
            autocast=True,
            progress=False,
            log_every=1,
        ),
    )
    for sae, log in zip(res.saes, res.logs):
        assert sae.W_enc.dtype == torch.float32
        assert log["nmse"].iloc[-5:].mean() < log["nmse"].iloc[:5].mean()


def test_autocast_default_follows_the_hardware_and_the_size(monkeypatch):
    """autocast=None: bf16 on a CPU whose torch reports AVX-512 BF16 (AMX tiles or not), fp32 on one
    without (no bf16 hardware), and on such a CPU only for a step large enough to pay for the casts
    (rows x d_in x d_sae at least CPU_BF16_MIN_WORK); an explicit True/False wins either way."""
    from saekit.train import Trainer
    from saekit.train.config import CPU_BF16_MIN_WORK, PRECISIONS, cpu_has_bf16_hardware

    large = SAEConfig(arch="batchtopk", d_in=64, d_sae=512, k=3)  # 64 x 512 x 1,024 rows = 2^25
    small = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3)
    assert (
        1024 * 64 * 512 >= CPU_BF16_MIN_WORK > 1024 * 16 * 64 and 512 * 64 * 512 < CPU_BF16_MIN_WORK
    )
    for amx, bf16, expect in ((True, True, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        assert cpu_has_bf16_hardware() is expect
        tc = {
            p: TrainConfig(batch_size=1024, autocast=PRECISIONS[p])
            for p in ("auto", "fp32", "bf16")
        }
        assert [tc[p].uses_autocast("cpu", large) for p in ("auto", "fp32", "bf16")] == [
            expect,
            False,
            True,
        ]
        assert [tc[p].uses_autocast("cpu", small) for p in ("auto", "fp32", "bf16")] == [
            False,
            False,
            True,
        ]
        # too few rows for that size
        assert tc["auto"].uses_autocast("cpu", large, batch=512) is False
        tr = Trainer(
            [large, small],
            TrainConfig(total_tokens=4096, batch_size=1024, progress=False, device="cpu"),
        )
        assert tr.autocasts == [expect, False]  # each SAE by its own size
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the check: fp32
    assert (
        TrainConfig().uses_autocast("cpu", large) is False
        and TrainConfig().uses_autocast("meta", large) is False
    )


def test_the_cli_prints_each_saes_precision_where_they_differ(monkeypatch, capsys):
    """saekit train/sweep print the precision: one line where every SAE trains alike, one per SAE
    where the size rule gives them different ones."""
    from saekit.cli.commands import _print_lrs

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    large = SAEConfig(arch="batchtopk", d_in=64, d_sae=512, k=3)
    small = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3)
    _print_lrs([large, small], TrainConfig(batch_size=1024, device="cpu"))
    out = capsys.readouterr().out
    assert (
        "precision of batchtopk_k3_512: bf16 autocast on cpu" in out
        and "of batchtopk_k3_64: fp32 on cpu" in out
    )
    _print_lrs([large, small], TrainConfig(batch_size=1024, device="cpu", autocast=False))
    assert "precision: fp32 on cpu\n" in capsys.readouterr().out  # forced: one line, no "auto"
