import pytest
import torch

from saekit.metrics import reconstruction_metrics
from saekit.sae import (
    SAEConfig,
    SAEConfigError,
    make_sae,
)
from saekit.toy import feature_recovery, make_toy
from saekit.train import TrainConfig, train


@pytest.fixture(scope="module")
def toy():
    """48 features in 16 dims, Poisson(3) of them per sample."""
    return make_toy(n_samples=24_000, d=16, n_features=48, mean_active=3, seed=0, freq_decay=0.0)


@pytest.fixture(scope="module")
def trained(toy):
    """BatchTopK and TopK (k=3, 2x dictionary) trained on the same toy stream, in one run."""
    cfgs = [
        SAEConfig(arch=a, d_in=16, d_sae=96, k=3, dead_tokens=2000) for a in ("batchtopk", "topk")
    ]
    res = train(
        toy.x[:20_000],
        cfgs,
        TrainConfig(
            total_tokens=20_000 * 15, batch_size=256, lr=3e-3, warmup_steps=20, progress=False
        ),
    )
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
    """The BatchTopK paper's code draws W_enc [d_in, d_sae] with torch's kaiming_uniform_ defaults;
    "paper" must be the mean column norm that draw has."""
    torch.manual_seed(0)
    for d_in, d_sae in ((64, 512), (576, 4608), (128, 256)):
        drawn = torch.nn.init.kaiming_uniform_(torch.empty(d_in, d_sae)).norm(dim=0).mean().item()
        assert SAEConfig(
            d_in=d_in, d_sae=d_sae, enc_init_norm="paper"
        ).encoder_start_norm == pytest.approx(drawn, rel=0.02)


@pytest.mark.parametrize("bad", [0, -1.0, "large", None, True])
def test_bad_encoder_start_norm_is_refused(bad):
    with pytest.raises(SAEConfigError, match=r"enc_init_norm.*a positive number or 'paper'"):
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
    """Kill half the dictionary (encoder bias far negative); with AuxK the dead fraction falls,
    without it it stays. Measured (150 steps): start 1: 0.49 -> 0.12 with AuxK, 0.50 -> 0.46
    without; the paper's start (0.5 here): 0.50 -> 0.31 with, 0.52 -> 0.52 without (smaller
    starts revive fewer on this toy: 128 latents, 48 features)."""

    def run(alpha):
        cfg = SAEConfig(
            arch="topk",
            d_in=16,
            d_sae=128,
            k=3,
            dead_tokens=512,
            aux_alpha=alpha,
            k_aux=64,
            enc_init_norm=start,
        )
        from saekit.train import Trainer

        t = Trainer(
            [cfg],
            TrainConfig(
                total_tokens=256 * 150,
                batch_size=256,
                lr=3e-3,
                warmup_steps=5,
                progress=False,
                calibrate_batches=0,
            ),
        )
        t.initialise(toy.x[:4096])
        with torch.no_grad():
            # pre-activations scale with the start norm
            t.saes[0].b_enc[64:] = -2.0 * cfg.encoder_start_norm
        res = t.fit(toy.x[:20_000])
        return res.logs[0]

    with_aux, without = run(1 / 32), run(0.0)
    assert with_aux["dead_frac"].max() >= 0.4  # the latents were dead at some point
    assert with_aux["dead_frac"].iloc[-1] < revived_below, with_aux["dead_frac"].iloc[-1]
    assert without["dead_frac"].iloc[-1] > 0.4


@pytest.mark.parametrize("bad", ["large", "-1", "0"])
def test_bad_encoder_start_flag_is_refused_by_the_cli(bad, capsys):
    from saekit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--store", "s", "--out", "o", "--enc-init-norm", bad])
    assert "enc-init-norm must be 'paper' or a positive number" in capsys.readouterr().err
    assert (
        build_parser()
        .parse_args(["train", "--store", "s", "--out", "o", "--enc-init-norm", "0.7"])
        .enc_init_norm
        == 0.7
    )


def test_decoder_gradient_loses_only_its_component_along_each_row():
    torch.manual_seed(0)
    sae = make_sae(arch="batchtopk", d_in=12, d_sae=40, k=3)
    with torch.no_grad():
        # rows of several norms: the projection divides by |w|^2
        sae.W_dec.mul_(torch.rand(40, 1) + 0.5)
    g = torch.randn(40, 12)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grad()
    W = sae.W_dec.detach()
    along = (g * W).sum(-1, keepdim=True) / (W * W).sum(-1, keepdim=True) * W
    torch.testing.assert_close(sae.W_dec.grad, g - along)
    assert float((sae.W_dec.grad * W).sum(-1).abs().max()) < 1e-5
