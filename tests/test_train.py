import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
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
    return [SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=300),
            SAEConfig(arch="jumprelu", d_in=16, d_sae=64, target_l0=3)]


def test_resume_reproduces_uninterrupted_weights_exactly(toy_x, tmp_path):
    tc = TrainConfig(total_tokens=128 * 60, batch_size=128, lr=3e-3, warmup_steps=5, checkpoint_every=10,
                     progress=False)
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
    cfgs = [SAEConfig(arch=a, d_in=16, d_sae=64, k=k, target_l0=k) for a in ("batchtopk", "topk", "jumprelu")
            for k in (2, 4)]
    tc = TrainConfig(total_tokens=128 * 20, batch_size=128, warmup_steps=2, progress=False, calibrate_batches=0,
                     init_tokens=128)
    res = train(src, cfgs, tc)
    assert res.steps == 20 and len(res.saes) == 6
    assert len(reads) == 20 + 1  # 20 steps + one batch for initialisation, for all six SAEs
    assert len(set(res.names)) == 6
    for log in res.logs:
        assert {"step", "tokens", "loss", "mse", "aux", "sparsity", "nmse", "l0", "dead_frac", "lr", "theta"} <= set(log)


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == pytest.approx(1.0) and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
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
    tc = TrainConfig(total_tokens=128 * 30, batch_size=128, warmup_steps=1, checkpoint_every=5, progress=False,
                     seed=0, init_tokens=128)
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
    assert (ck / "state.json").exists() and json.loads((ck / "state.json").read_text())["step"] == 10


def test_outputs_are_saelens_folders_with_logs(toy_x, tmp_path):
    tc = TrainConfig(total_tokens=128 * 12, batch_size=128, warmup_steps=1, progress=False, log_every=4)
    res = train(toy_x, _cfgs(), tc, out=tmp_path / "o")
    for name in res.names:
        folder = tmp_path / "o" / name
        sae = load_sae(folder)
        assert sae.cfg.d_sae == 64
        log = (folder / "train_log.csv").read_text().splitlines()
        assert log[0].startswith("step,tokens,loss") and len(log) == 1 + 3
    cfg = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert cfg["steps"] == 12 and cfg["names"] == res.names


def test_cli_capture_train_eval(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "saekit", *a], capture_output=True, text=True, timeout=600)
    r = run("capture", "--hook", "resid_post.2", "--tokens", "1500", "--seq-len", "64", "--out", str(tmp_path / "st"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("train", "--store", str(tmp_path / "st"), "--arch", "batchtopk", "topk", "--k", "8", "--expansion", "2",
            "--tokens", "3000", "--batch-size", "256", "--enc-init-norm", "0.7", "--precision", "fp32",
            "--out", str(tmp_path / "tr"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batchtopk_k8_1152" in r.stdout and "topk_k8_1152" in r.stdout
    assert load_sae(tmp_path / "tr" / "topk_k8_1152").cfg.enc_init_norm == 0.7  # the flag reached the config
    assert "precision: fp32 on cpu" in r.stdout  # --precision reached the trainer, and its record
    assert json.loads((tmp_path / "tr" / "train_config.json").read_text())["autocast"] == [False, False]
    r = run("eval", str(tmp_path / "tr" / "batchtopk_k8_1152"), "--store", str(tmp_path / "st"), "--json",
            "--ce-tokens", "60")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["sae"]["architecture"] == "batchtopk" and 0 < m["reconstruction"]["nmse"] < 1.5
    assert m["n_tokens"] >= 1500 and m["downstream"]["ce_sae"] > m["downstream"]["ce_clean"]
    r = run("capture", "--hook", "resid_post.99", "--tokens", "100", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "out of range" in r.stderr
    r = run("train", "--store", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no activations" in r.stderr


def test_bf16_autocast_trains(toy_x):
    """The mixed-precision path (bf16 autocast, fp32 master weights) runs and learns, here on CPU."""
    cfgs = [SAEConfig(arch=a, d_in=16, d_sae=64, k=3, target_l0=3) for a in ("batchtopk", "topk", "jumprelu")]
    res = train(toy_x, cfgs, TrainConfig(total_tokens=128 * 40, batch_size=128, lr=3e-3, warmup_steps=2,
                                         autocast=True, progress=False, log_every=1))
    for sae, log in zip(res.saes, res.logs):
        assert sae.W_enc.dtype == torch.float32
        assert log["nmse"].iloc[-5:].mean() < log["nmse"].iloc[:5].mean()


def test_autocast_default_follows_the_hardware_and_the_size(monkeypatch):
    """autocast=None: bf16 on a CPU whose torch reports AVX-512 BF16 (AMX tiles or not), fp32 on one without (no bf16
    hardware), and on such a CPU only for a step large enough to pay for the casts (rows x d_in x d_sae at least
    CPU_BF16_MIN_WORK); an explicit True/False wins either way."""
    from saekit.train import Trainer
    from saekit.train.config import CPU_BF16_MIN_WORK, PRECISIONS, cpu_has_bf16_hardware

    large = SAEConfig(arch="batchtopk", d_in=64, d_sae=512, k=3)  # 64 x 512 x 1,024 rows = 2^25
    small = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3)
    assert 1024 * 64 * 512 >= CPU_BF16_MIN_WORK > 1024 * 16 * 64 and 512 * 64 * 512 < CPU_BF16_MIN_WORK
    for amx, bf16, expect in ((True, True, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v)
        assert cpu_has_bf16_hardware() is expect
        tc = {p: TrainConfig(batch_size=1024, autocast=PRECISIONS[p]) for p in ("auto", "fp32", "bf16")}
        assert [tc[p].uses_autocast("cpu", large) for p in ("auto", "fp32", "bf16")] == [expect, False, True]
        assert [tc[p].uses_autocast("cpu", small) for p in ("auto", "fp32", "bf16")] == [False, False, True]
        assert tc["auto"].uses_autocast("cpu", large, batch=512) is False  # too few rows for that size
        tr = Trainer([large, small], TrainConfig(total_tokens=4096, batch_size=1024, progress=False, device="cpu"))
        assert tr.autocasts == [expect, False]  # each SAE by its own size
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the check: fp32
    assert TrainConfig().uses_autocast("cpu", large) is False and TrainConfig().uses_autocast("meta", large) is False


def test_the_cli_prints_each_saes_precision_where_they_differ(monkeypatch, capsys):
    """saekit train/sweep print the precision: one line where every SAE trains alike, one per SAE where the size
    rule gives them different ones."""
    from saekit.commands import _print_lrs

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    large = SAEConfig(arch="batchtopk", d_in=64, d_sae=512, k=3)
    small = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3)
    _print_lrs([large, small], TrainConfig(batch_size=1024, device="cpu"))
    out = capsys.readouterr().out
    assert "precision of batchtopk_k3_512: bf16 autocast on cpu" in out and "of batchtopk_k3_64: fp32 on cpu" in out
    _print_lrs([large, small], TrainConfig(batch_size=1024, device="cpu", autocast=False))
    assert "precision: fp32 on cpu\n" in capsys.readouterr().out  # forced: one line, no "auto"


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
    tc = TrainConfig(total_tokens=256 * 150, batch_size=256, lr=3e-3, warmup_steps=10, progress=False)
    res = train(toy_x, [cfg], tc)
    log = res.logs[0]
    assert log["l0"].iloc[0] == pytest.approx(target, rel=0.3)  # data-driven start, not the fixed 0.01
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


def test_prefetcher_keeps_order_reports_waiting_and_passes_errors_on():
    import time as _time

    from saekit.train import Prefetcher

    def slow():
        for i in range(5):
            _time.sleep(0.02)
            yield torch.full((2, 3), float(i))

    p = Prefetcher(slow(), torch.device("cpu"), depth=2)
    got = [int(x[0, 0]) for x in p]
    assert got == [0, 1, 2, 3, 4] and p.wait_s > 0.02  # the consumer waited for the slow reader

    def broken():
        yield torch.zeros(2, 3)
        raise OSError("shard 3 is unreadable")

    with pytest.raises(OSError, match="shard 3"):
        list(Prefetcher(broken(), torch.device("cpu")))


def test_prefetched_training_equals_unprefetched_and_reports_data_share():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=4)
    runs = []
    for prefetch in (0, 2):
        tc = TrainConfig(total_tokens=4096 * 2, batch_size=256, lr=1e-3, warmup_steps=2, progress=False,
                         prefetch=prefetch)
        runs.append(train(x, [cfg], tc))
    for a, b in zip(runs[0].saes[0].state_dict().values(), runs[1].saes[0].state_dict().values()):
        assert torch.equal(a, b)
    assert all(0 < r.data_share < 1 for r in runs)  # reading time is measured with and without read-ahead


def test_auxk_every_few_steps_runs_on_schedule_weighted_and_resumes_exactly(toy_x, tmp_path):
    """aux_every=3: the AuxK term is there on steps 0, 3, 6, ... only (dead latents on every step), weighted by 3
    in the loss; the schedule follows the step count, so a resumed run still equals an uninterrupted one."""
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=1, aux_every=3)
    tc = TrainConfig(total_tokens=128 * 9, batch_size=128, lr=3e-3, warmup_steps=1, progress=False, log_every=1)
    log = train(toy_x, cfg, tc).logs[0]
    has_aux = (log["aux"] > 0).tolist()
    # log row i is step i (0-based); at step 0 no latent has had the chance to die yet
    assert has_aux == [s % 3 == 0 and s > 0 for s in range(9)], has_aux
    with_aux = log.iloc[3]
    assert with_aux["loss"] == pytest.approx(with_aux["mse"] + 3 * cfg.aux_alpha * with_aux["aux"], rel=1e-5)
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
    """train_step's statistics are computed and read back only when asked for (one transfer): they must still be
    the figures of that step's forward pass and of the state right after it, in the log's column order."""
    import copy

    from saekit.metrics import nmse
    from saekit.train import Trainer

    torch.manual_seed(0)
    tr = Trainer([SAEConfig(arch="batchtopk", d_in=toy_x.shape[1], d_sae=64, k=4, dead_tokens=256)],
                 TrainConfig(total_tokens=10**6, batch_size=128, warmup_steps=0, progress=False))
    tr.initialise(toy_x[:512])
    for i in range(3):
        tr.train_step(toy_x[i * 128:(i + 1) * 128])
    x = toy_x[512:640]
    before = copy.deepcopy(tr.saes[0])
    row = tr.train_step(x)[0]  # not read yet
    after = tr.saes[0]
    theta, dead = float(after.threshold), float(after.dead_mask().float().mean())
    tr.saes[0].tokens_since_fired.fill_(10**6)  # the next step changes the counters and theta...
    tr.train_step(toy_x[640:768])
    assert float(tr.saes[0].threshold) != theta
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tr.autocasts[0]):  # the step's own precision
        out = before.training_loss(x)  # ...and the row, read only now, still holds this step's figures
    assert list(row)[:4] == ["step", "tokens", "loss", "lr"] and row["step"] == 4 and row["tokens"] == 4 * 128
    assert row["loss"] == pytest.approx(float(out.loss.detach()), rel=1e-5)
    assert row["nmse"] == pytest.approx(nmse(out.x.detach(), out.x_hat.detach()), rel=1e-5)
    assert row["l0"] == pytest.approx(float(out.l0.float().mean()), rel=1e-6)
    assert row["dead_frac"] == pytest.approx(dead) and row["dead_frac"] < 1
    assert row["theta"] == pytest.approx(theta) and theta > 0


def _steps(cfg, x, sync_free, batch, steps, spoil_at=None, spoil=None):
    """A Trainer's first `steps` steps on x, selecting without read-backs where sync_free; spoil(trainer) before
    step spoil_at."""
    from saekit.train import Trainer

    torch.manual_seed(0)
    # fp32: under bf16 pre-activations tie at the cut, and the two selections may keep different tied entries
    tr = Trainer([cfg], TrainConfig(total_tokens=10**6, batch_size=batch, warmup_steps=0, progress=False, log_every=1,
                                    autocast=False, sync_free=sync_free))
    tr.initialise(x[:4 * batch])
    for i in range(steps):
        if i == spoil_at:
            spoil(tr)
        tr.train_step(x[i * batch:(i + 1) * batch])
    return tr


def test_sync_free_training_equals_exact_training_and_redoes_a_step_it_cannot_prove(toy_x, monkeypatch):
    """A BatchTopK run whose selections are made without read-backs (sync_free, the default on an accelerator)
    ends with exactly the weights, theta, counters and log of a run with exact selections. A step whose
    candidates could not hold the top B*k (here: its hint spoilt) is flagged and redone exactly by the trainer."""
    import saekit.sae.fast.paths as paths
    import saekit.sae.fast.select as A

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)  # the sparse path at toy size
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    flags = []

    def spy(*args):
        out = A.batch_topk_static.__wrapped__(*args)
        flags.append(bool(out[2]))
        return out

    spy.__wrapped__ = A.batch_topk_static
    monkeypatch.setattr(A, "batch_topk_static", spy)
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=256)

    def spoil(tr):
        tr.hints[0]["previous_cut"] *= 100

    def run(sync_free, spoil_at=None):
        return _steps(cfg, toy_x, sync_free, batch=128, steps=12, spoil_at=spoil_at, spoil=spoil)

    exact = run(False)
    assert flags == []
    free = run(True, spoil_at=6)
    assert len(flags) == 11 and flags[5] is False and flags.count(False) == 1  # steps 1-11; step 0 has no cut
    for k, v in exact.saes[0].state_dict().items():
        assert torch.equal(v, free.saes[0].state_dict()[k]), k
    log_exact, log_free = exact.log_frames()[0], free.log_frames()[0]
    assert (log_exact["aux"] > 0).any() and (log_exact["dead_frac"] > 0).any()  # AuxK had dead latents to use
    pd.testing.assert_frame_equal(log_exact, log_free)
    cfg = SAEConfig(arch="topk", d_in=16, d_sae=64, k=3, dead_tokens=256)  # TopK's selection without read-backs
    exact, free = run(False).saes[0].state_dict(), run(True).saes[0].state_dict()
    assert all(torch.equal(v, free[k]) for k, v in exact.items())


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "jumprelu"])
def test_the_cpus_read_per_value_and_theta_on_the_host_train_as_the_gpus_way(arch, toy_x):
    """On the CPU (sync_free unset) the trainer reads its check back one value at a time; set (False), the CPU
    steps as a GPU does (one stacked read-back). The two runs end with the same weights, counters, theta and log."""
    cfg = SAEConfig(arch=arch, d_in=16, d_sae=64, k=3, target_l0=3, dead_tokens=256)
    cpu, gpu_way = _steps(cfg, toy_x, None, batch=128, steps=12), _steps(cfg, toy_x, False, batch=128, steps=12)
    for k, v in gpu_way.saes[0].state_dict().items():
        torch.testing.assert_close(cpu.saes[0].state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    log_cpu, log_gpu = cpu.log_frames()[0], gpu_way.log_frames()[0]
    assert (log_gpu["dead_frac"] > 0).any() and (log_gpu["aux"] > 0).any() == cpu.saes[0].uses_auxk  # AuxK ran
    pd.testing.assert_frame_equal(log_cpu, log_gpu, check_exact=False, rtol=1e-6)
    if arch == "batchtopk":
        assert 0 < float(cpu.saes[0].threshold) and int(cpu.saes[0].threshold_updates) == 12


def test_stack_scalars_reads_every_dtype_exactly_in_one_operator():
    """The read-back's stack: bools, integers past float32's exact range, bf16 and float32 values come out as
    float64 numbers equal to each value's own, through one dispatched operator (into `out` where given)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from saekit.train.optim import stack_scalars

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    values = [torch.tensor(float("nan")), torch.tensor(True), torch.tensor(2**40 + 3), torch.tensor(False),
              torch.tensor(0.3, dtype=torch.bfloat16), torch.tensor(1 / 3, requires_grad=True) * 1]
    out = torch.zeros(len(values), dtype=torch.float64)
    with Ops() as ops:
        got = stack_scalars(values, out=out)
    assert got is out and [n for n in ops.names if "detach" not in n] == ["aten.stack.out"]
    want = [float("nan"), 1.0, float(2**40 + 3), 0.0, float(values[4]), float(values[5].detach())]
    assert math.isnan(got[0]) and got[1:].tolist() == want[1:]
    assert stack_scalars(values).dtype == torch.float64 and stack_scalars(values)[2] == 2**40 + 3


def test_clipping_in_the_step_is_torchs_clip_then_step():
    """saekit.train.optim.clip_in_step (the scale handed to fused Adam as its grad_scale) returns torch's total norm
    and moves every parameter as torch.nn.utils.clip_grad_norm_ followed by the same Adam step does, above the
    limit and below it, over three steps (Adam's state too), a parameter without a gradient left alone."""
    from saekit.train.optim import clip_in_step, drop_grads

    for scale, max_norm in ((10.0, 1.0), (0.01, 1.0), (3.0, 0.5)):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in ((64, 16), (16,), (64,), (3, 3))]
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt_p, opt_q = (torch.optim.Adam(v, lr=1e-2, fused=True) for v in (ps, qs))
        for _ in range(3):
            for p, q in zip(ps[:3], qs[:3]):
                p.grad = torch.randn_like(p) * scale
                q.grad = p.grad.clone()
            total = clip_in_step(opt_p, ps, max_norm)
            torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(qs, max_norm))
            assert float(opt_p.grad_scale) >= 1.0 and (float(opt_p.grad_scale) > 1.0) == (float(total) > max_norm)
            opt_p.step()
            opt_q.step()
            for p, q in zip(ps, qs):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert ps[3].grad is None and torch.equal(ps[3].detach(), qs[3].detach())
    drop_grads(ps)
    assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_sync_free_thresholded_training_equals_exact_training(arch, toy_x, monkeypatch):
    """JumpReLU and ReLU-L1 runs whose entries are found without read-backs (slots from the previous step's density,
    read back with the trainer's flags) end with the weights and log of exact runs; a step whose slots were too few
    (here: the density hint spoilt) is flagged and redone exactly."""
    import saekit.sae.fast.paths as paths

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)  # the sparse path at toy size
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    cfg = SAEConfig(arch=arch, d_in=16, d_sae=64, target_l0=3, l1_coeff=1.0)
    found = []
    entries = paths.entries
    monkeypatch.setattr(paths, "entries", lambda a, bound, step: found.append(e := entries(a, bound, step)) or e)

    def spoil(tr):
        tr.hints[0]["previous_density"] = 0.0  # 1,024 slots: too few

    def run(sync_free, spoil_at=None):
        return _steps(cfg, toy_x, sync_free, batch=512, steps=10, spoil_at=spoil_at, spoil=spoil)

    exact = run(False)
    assert all(e.valid is None for e in found)
    found.clear()
    free = run(True, spoil_at=5)
    flags = [bool(e.exact) for e in found if e.exact is not None]  # steps 1-9 (step 0 has no density yet)
    assert len(flags) == 9 and flags.count(False) == 1 and not flags[4]
    assert sum(e.exact is None for e in found) == 2  # step 0, and step 5 redone exactly
    assert int(found[-1].count) > 1024
    for k, v in exact.saes[0].state_dict().items():
        assert torch.equal(v, free.saes[0].state_dict()[k]), k
    pd.testing.assert_frame_equal(exact.log_frames()[0], free.log_frames()[0])


def test_jumprelu_chooses_its_path_from_the_previous_steps_density_and_resumes_with_it(toy_x, tmp_path, monkeypatch):
    """JumpReLU's fast path estimates the code's density from the previous step's sparse path (no probe encode of
    128 rows, no read-back) once it has one; checkpoints keep that density (and BatchTopK's previous cut), so a
    resumed run chooses its steps' paths as the uninterrupted run does, and ends with its weights."""
    import saekit.sae.fast.paths as paths

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)  # the sparse path at toy size
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    from saekit.sae import SAE
    from saekit.train import checkpoints

    probes = []
    pre_acts = SAE.pre_acts
    monkeypatch.setattr(SAE, "pre_acts", lambda self, x, *xc: probes.append(x.shape[0]) or pre_acts(self, x, *xc))
    cfgs = [SAEConfig(arch="jumprelu", d_in=16, d_sae=64, target_l0=3),
            SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3)]
    tc = TrainConfig(total_tokens=256 * 8, batch_size=256, warmup_steps=1, progress=False, checkpoint_every=4)
    whole = train(toy_x, cfgs, tc, out=tmp_path / "a")
    assert probes.count(128) == 1  # step 0's probe only: the later steps know the previous step's density
    hints = checkpoints.progress(checkpoints.latest(tmp_path / "a" / "checkpoints"))["hints"]
    assert hints[0]["previous_density"] > 0 and hints[1]["previous_cut"] > 0

    def crash(trainer, stats):
        if trainer.step == 6:
            raise KeyboardInterrupt  # resumed from the checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        train(toy_x, cfgs, tc, out=tmp_path / "b", callback=crash)
    probes.clear()
    resumed = train(toy_x, cfgs, tc, out=tmp_path / "b")
    assert probes.count(128) == 0  # the checkpoint's density: no probe at the first resumed step either
    for w, r in zip(whole.saes, resumed.saes):
        for k, v in w.state_dict().items():
            assert torch.equal(v, r.state_dict()[k]), k


def test_a_selection_that_stays_inexact_when_redone_is_an_error(toy_x, monkeypatch):
    """The trainer redoes a step whose selection was not exact once; a select that ignores Step(exact=True) would
    leave an inexact step in training, so it stops with an error that names the SAE and the rule."""
    import saekit.sae.fast.paths as paths
    from saekit.sae import Selection, Step
    from saekit.train import Trainer

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    tr = Trainer([SAEConfig(arch="topk", d_in=16, d_sae=64, k=3)],
                 TrainConfig(total_tokens=10**6, batch_size=128, progress=False))
    tr.initialise(toy_x[:512])
    sae = tr.saes[0]
    real = sae.select
    sae.select = lambda a, mode=None, step=Step(): Selection(*real(a, mode, step)[:2], None, torch.tensor(False))
    with pytest.raises(TrainingError, match="not exact even when redone"):
        tr.train_step(toy_x[:128])
