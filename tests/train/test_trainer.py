import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saekit.sae import SAEConfig, load_sae
from saekit.sae.config import SAEConfigError
from saekit.toy import make_toy
from saekit.train import TrainConfig, TrainingError, as_source, geometric_median, lr_factor, train


@pytest.fixture(scope="module")
def toy_x():
    return make_toy(n_samples=6000, d=16, n_features=48, mean_active=3, seed=1).x


def _cfgs():
    return [
        SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=300),
        SAEConfig(arch="jumprelu", d_in=16, d_sae=64, target_l0=3),
    ]


def test_resume_reproduces_uninterrupted_weights_exactly(toy_x, tmp_path):
    tc = TrainConfig(
        total_tokens=128 * 60,
        batch_size=128,
        lr=3e-3,
        warmup_steps=5,
        checkpoint_every=10,
        progress=False,
    )
    full = train(toy_x, _cfgs(), tc, out=tmp_path / "full")

    def crash(trainer, stats):
        if trainer.step == 25:
            raise KeyboardInterrupt  # the job dies between checkpoints

    with pytest.raises(KeyboardInterrupt):
        train(toy_x, _cfgs(), tc, out=tmp_path / "part", callback=crash)
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").glob("step_*"))
    assert ckpts[-1] == "step_00000020" and len(ckpts) <= 2  # older checkpoints pruned
    resumed = train(toy_x, _cfgs(), tc, out=tmp_path / "part")  # picks up at step 20
    assert resumed.steps == full.steps == 60
    for a, b in zip(full.saes, resumed.saes):
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), n
    pd_full, pd_res = full.logs[0], resumed.logs[0]
    assert pd_full["loss"].tolist() == pd_res["loss"].tolist()


def test_several_saes_share_one_read_of_each_batch(toy_x):
    reads = []
    src = as_source(toy_x)
    orig = src.batches

    def counting(*a, **k):
        for x in orig(*a, **k):
            reads.append(1)
            yield x

    src.batches = counting
    cfgs = [
        SAEConfig(arch=a, d_in=16, d_sae=64, k=k, target_l0=k)
        for a in ("batchtopk", "topk", "jumprelu")
        for k in (2, 4)
    ]
    tc = TrainConfig(
        total_tokens=128 * 20,
        batch_size=128,
        warmup_steps=2,
        progress=False,
        calibrate_batches=0,
        init_tokens=128,
    )
    res = train(src, cfgs, tc)
    assert res.steps == 20 and len(res.saes) == 6
    assert len(reads) == 20 + 1  # 20 steps + one batch for initialisation, for all six SAEs
    assert len(set(res.names)) == 6
    for log in res.logs:
        assert {
            "step",
            "tokens",
            "loss",
            "mse",
            "aux",
            "sparsity",
            "nmse",
            "l0",
            "dead_frac",
            "lr",
            "theta",
        } <= set(log)


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert (
        f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    )
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_geometric_median_resists_outliers():
    x = torch.zeros(101, 3)
    x[:50] = torch.tensor([1.0, 0, 0])
    x[50:] = torch.tensor([-1.0, 0, 0])
    x[100] = torch.tensor([1000.0, 1000.0, 0])
    gm = geometric_median(x)
    assert gm.norm() < 1.5 and x.mean(0).norm() > 9


def test_training_accepts_npy_and_safetensors(toy_x, tmp_path):
    np.save(tmp_path / "a.npy", toy_x.numpy())
    save_file({"activations": toy_x.contiguous()}, str(tmp_path / "a.safetensors"))
    tc = TrainConfig(total_tokens=128 * 5, batch_size=128, warmup_steps=1, progress=False)
    for f in ("a.npy", "a.safetensors"):
        res = train(tmp_path / f, SAEConfig(arch="topk", d_in=16, d_sae=32, k=2), tc)
        assert res.steps == 5


def test_bad_training_inputs(toy_x, tmp_path):
    tc = TrainConfig(total_tokens=128 * 5, batch_size=128, warmup_steps=1, progress=False)
    with pytest.raises(TrainingError, match="d_in=20"):
        train(toy_x, SAEConfig(arch="topk", d_in=20, d_sae=64, k=2), tc)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train(toy_x[:10], SAEConfig(arch="topk", d_in=16, d_sae=64, k=2), tc)
    with pytest.raises(TrainingError, match="2-D"):
        train(toy_x[0], SAEConfig(arch="topk", d_in=16, d_sae=64, k=2), tc)
    with pytest.raises(TrainingError, match="no activations"):
        train(tmp_path / "missing.npy", SAEConfig(arch="topk", d_in=16, d_sae=64, k=2), tc)
    (tmp_path / "bad.npy").write_bytes(b"not an npy")
    with pytest.raises(TrainingError, match="not a readable"):
        train(tmp_path / "bad.npy", SAEConfig(arch="topk", d_in=16, d_sae=64, k=2), tc)


def test_nan_in_inputs_stops_with_step_and_keeps_last_checkpoint(toy_x, tmp_path):
    x = toy_x.clone()
    tc = TrainConfig(
        total_tokens=128 * 30,
        batch_size=128,
        warmup_steps=1,
        checkpoint_every=5,
        progress=False,
        seed=0,
        init_tokens=128,
    )
    # poison one row of batch 12 under this seed (one that the initialisation batch does not hold)
    order = list(as_source(x).batches(128, seed=0, epochs=1))
    init = next(as_source(x).batches(128, seed=0 + 7919))
    row = next(r for r in order[12] if not (init == r).all(-1).any())
    bad_row = (x == row).all(-1).nonzero()[0, 0]
    x[bad_row, 3] = float("nan")
    with pytest.raises(TrainingError) as e:
        train(x, SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3), tc, out=tmp_path / "run")
    msg = str(e.value)
    assert "step 12" in msg and "input" in msg and "step_00000010" in msg
    ck = tmp_path / "run" / "checkpoints" / "step_00000010"
    assert (ck / "state.json").exists() and json.loads((ck / "state.json").read_text())[
        "step"
    ] == 10


def test_outputs_are_saelens_folders_with_logs(toy_x, tmp_path):
    tc = TrainConfig(
        total_tokens=128 * 12, batch_size=128, warmup_steps=1, progress=False, log_every=4
    )
    res = train(toy_x, _cfgs(), tc, out=tmp_path / "o")
    for name in res.names:
        folder = tmp_path / "o" / name
        sae = load_sae(folder)
        assert sae.cfg.d_sae == 64
        log = (folder / "train_log.csv").read_text().splitlines()
        assert log[0].startswith("step,tokens,loss") and len(log) == 1 + 3
    cfg = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert cfg["steps"] == 12 and cfg["names"] == res.names


def test_empty_store_is_refused(store, tmp_path):
    import shutil

    from saekit.activations import StoreError

    d = tmp_path / "empty"
    shutil.copytree(store.path, d)
    m = json.loads((d / "manifest.json").read_text())
    m.update(shards=[], n_rows=0, complete=False)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="empty"):
        train(d, SAEConfig(arch="topk", d_in=576, d_sae=1152, k=4), TrainConfig(progress=False))


@pytest.mark.parametrize("target", [2.0, 6.0])
def test_jumprelu_target_l0_is_met(toy_x, target):
    """Thresholds start at the sample's target-L0 value and the penalty keeps L0 near the target."""
    cfg = SAEConfig(arch="jumprelu", d_in=16, d_sae=64, target_l0=target)
    tc = TrainConfig(
        total_tokens=256 * 150, batch_size=256, lr=3e-3, warmup_steps=10, progress=False
    )
    res = train(toy_x, [cfg], tc)
    log = res.logs[0]
    # data-driven start, not the fixed 0.01
    assert log["l0"].iloc[0] == pytest.approx(target, rel=0.3)
    assert log["l0"].tail(20).mean() == pytest.approx(target, rel=0.25)
    sae = res.saes[0]
    with torch.no_grad():
        z, _ = sae(toy_x[:2000])
    assert (z != 0).sum(-1).float().mean().item() == pytest.approx(target, rel=0.3)


def test_jumprelu_threshold_has_its_own_learning_rate():
    cfg = SAEConfig(arch="jumprelu", d_in=16, d_sae=64, target_l0=3, threshold_lr_scale=7.0)
    from saekit.sae import make_sae

    groups = make_sae(cfg).optim_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 7.0]
    assert [len(g["params"]) for g in groups] == [4, 1]


def test_auxk_every_few_steps_runs_on_schedule_weighted_and_resumes_exactly(toy_x, tmp_path):
    """aux_every=3: the AuxK term is there on steps 0, 3, 6, ... only (dead latents on every step),
    weighted by 3 in the loss; the schedule follows the step count, so a resumed run still equals
    an uninterrupted one."""
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=1, aux_every=3)
    tc = TrainConfig(
        total_tokens=128 * 9, batch_size=128, lr=3e-3, warmup_steps=1, progress=False, log_every=1
    )
    log = train(toy_x, cfg, tc).logs[0]
    has_aux = (log["aux"] > 0).tolist()
    # log row i is step i (0-based); at step 0 no latent has had the chance to die yet
    assert has_aux == [s % 3 == 0 and s > 0 for s in range(9)], has_aux
    with_aux = log.iloc[3]
    assert with_aux["loss"] == pytest.approx(
        with_aux["mse"] + 3 * cfg.aux_alpha * with_aux["aux"], rel=1e-5
    )
    tc = TrainConfig.from_dict({**tc.to_dict(), "checkpoint_every": 4})
    whole = train(toy_x, cfg, tc, out=tmp_path / "a").saes[0].state_dict()

    def crash(trainer, stats):
        if trainer.step == 6:
            raise KeyboardInterrupt  # killed after step 6; resumed from the checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        train(toy_x, cfg, tc, out=tmp_path / "b", callback=crash)
    resumed = train(toy_x, cfg, tc, out=tmp_path / "b").saes[0].state_dict()
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k
    with pytest.raises(SAEConfigError, match="aux_every"):
        SAEConfig(aux_every=0)


def test_step_statistics_are_the_steps_own_figures(toy_x):
    """train_step's statistics are computed and read back only when asked for (one transfer): they
    must still be the figures of that step's forward pass and of the state right after it, in the
    log's column order."""
    import copy

    from saekit.metrics import nmse
    from saekit.train import Trainer

    torch.manual_seed(0)
    tr = Trainer(
        [SAEConfig(arch="batchtopk", d_in=toy_x.shape[1], d_sae=64, k=4, dead_tokens=256)],
        TrainConfig(total_tokens=10**6, batch_size=128, warmup_steps=0, progress=False),
    )
    tr.initialise(toy_x[:512])
    for i in range(3):
        tr.train_step(toy_x[i * 128 : (i + 1) * 128])
    x = toy_x[512:640]
    before = copy.deepcopy(tr.saes[0])
    row = tr.train_step(x)[0]  # not read yet
    after = tr.saes[0]
    theta, dead = float(after.threshold), float(after.dead_mask().float().mean())
    tr.saes[0].tokens_since_fired.fill_(10**6)  # the next step changes the counters and theta...
    tr.train_step(toy_x[640:768])
    assert float(tr.saes[0].threshold) != theta
    # the step's own precision
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tr.autocasts[0]):
        # ...and the row, read only now, still holds this step's figures
        out = before.training_loss(x)
    assert (
        list(row)[:4] == ["step", "tokens", "loss", "lr"]
        and row["step"] == 4
        and row["tokens"] == 4 * 128
    )
    assert row["loss"] == pytest.approx(float(out.loss.detach()), rel=1e-5)
    assert row["nmse"] == pytest.approx(nmse(out.x.detach(), out.x_hat.detach()), rel=1e-5)
    assert row["l0"] == pytest.approx(float(out.l0.float().mean()), rel=1e-6)
    assert row["dead_frac"] == pytest.approx(dead) and row["dead_frac"] < 1
    assert row["theta"] == pytest.approx(theta) and theta > 0
