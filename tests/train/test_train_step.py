import math

import pandas as pd
import pytest
import torch

from saekit.sae import SAEConfig
from saekit.toy import make_toy
from saekit.train import TrainConfig, TrainingError, train


@pytest.fixture(scope="module")
def toy_x():
    return make_toy(n_samples=6000, d=16, n_features=48, mean_active=3, seed=1).x


def _steps(cfg, x, sync_free, batch, steps, spoil_at=None, spoil=None):
    """A Trainer's first `steps` steps on x, selecting without read-backs where sync_free;
    spoil(trainer) before step spoil_at."""
    from saekit.train import Trainer

    torch.manual_seed(0)
    # fp32: under bf16 pre-activations tie at the cut, and the two selections may keep
    # different tied entries
    tr = Trainer(
        [cfg],
        TrainConfig(
            total_tokens=10**6,
            batch_size=batch,
            warmup_steps=0,
            progress=False,
            log_every=1,
            autocast=False,
            sync_free=sync_free,
        ),
    )
    tr.initialise(x[: 4 * batch])
    for i in range(steps):
        if i == spoil_at:
            spoil(tr)
        tr.train_step(x[i * batch : (i + 1) * batch])
    return tr


def test_sync_free_training_equals_exact_training_and_redoes_a_step_it_cannot_prove(
    toy_x, monkeypatch
):
    """A BatchTopK run whose selections are made without read-backs (sync_free, the default on an
    accelerator) ends with exactly the weights, theta, counters and log of a run with exact
    selections. A step whose candidates could not hold the top B*k (here: its hint spoilt) is
    flagged and redone exactly by the trainer."""
    import saekit.sae.fast.paths as paths
    import saekit.sae.fast.select as A

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)  # the sparse path at toy size
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    flags = []

    def spy(*args):
        out = A.top_n_static.__wrapped__(*args)
        flags.append(bool(out[2]))
        return out

    spy.__wrapped__ = A.top_n_static
    monkeypatch.setattr(A, "top_n_static", spy)
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=256)

    def spoil(tr):
        tr.hints[0].previous_cut *= 100

    def run(sync_free, spoil_at=None):
        return _steps(cfg, toy_x, sync_free, batch=128, steps=12, spoil_at=spoil_at, spoil=spoil)

    exact = run(False)
    assert flags == []
    free = run(True, spoil_at=6)
    # steps 1-11; step 0 has no cut
    assert len(flags) == 11 and flags[5] is False and flags.count(False) == 1
    for k, v in exact.saes[0].state_dict().items():
        assert torch.equal(v, free.saes[0].state_dict()[k]), k
    log_exact, log_free = exact.log_frames()[0], free.log_frames()[0]
    # AuxK had dead latents to use
    assert (log_exact["aux"] > 0).any() and (log_exact["dead_frac"] > 0).any()
    pd.testing.assert_frame_equal(log_exact, log_free)
    # TopK's selection without read-backs
    cfg = SAEConfig(arch="topk", d_in=16, d_sae=64, k=3, dead_tokens=256)
    exact, free = run(False).saes[0].state_dict(), run(True).saes[0].state_dict()
    assert all(torch.equal(v, free[k]) for k, v in exact.items())


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "jumprelu"])
def test_the_cpus_read_per_value_and_theta_on_the_host_train_as_the_gpus_way(arch, toy_x):
    """On the CPU (sync_free unset) the trainer reads its check back one value at a time; set
    (False), the CPU steps as a GPU does (one stacked read-back). The two runs end with the same
    weights, counters, theta and log."""
    cfg = SAEConfig(arch=arch, d_in=16, d_sae=64, k=3, target_l0=3, dead_tokens=256)
    cpu, gpu_way = (
        _steps(cfg, toy_x, None, batch=128, steps=12),
        _steps(cfg, toy_x, False, batch=128, steps=12),
    )
    for k, v in gpu_way.saes[0].state_dict().items():
        torch.testing.assert_close(cpu.saes[0].state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    log_cpu, log_gpu = cpu.log_frames()[0], gpu_way.log_frames()[0]
    # AuxK ran
    assert (log_gpu["dead_frac"] > 0).any() and (log_gpu["aux"] > 0).any() == cpu.saes[0].uses_auxk
    pd.testing.assert_frame_equal(log_cpu, log_gpu, check_exact=False, rtol=1e-6)
    if arch == "batchtopk":
        assert 0 < float(cpu.saes[0].threshold) and int(cpu.saes[0].threshold_updates) == 12


def test_stack_scalars_reads_every_dtype_exactly_in_one_operator():
    """The read-back's stack: bools, integers past float32's exact range, bf16 and float32 values
    come out as float64 numbers equal to each value's own, through one dispatched operator (into
    `out` where given)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from saekit.train.optim import stack_scalars

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    values = [
        torch.tensor(float("nan")),
        torch.tensor(True),
        torch.tensor(2**40 + 3),
        torch.tensor(False),
        torch.tensor(0.3, dtype=torch.bfloat16),
        torch.tensor(1 / 3, requires_grad=True) * 1,
    ]
    out = torch.zeros(len(values), dtype=torch.float64)
    with Ops() as ops:
        got = stack_scalars(values, out=out)
    assert got is out and [n for n in ops.names if "detach" not in n] == ["aten.stack.out"]
    want = [float("nan"), 1.0, float(2**40 + 3), 0.0, float(values[4]), float(values[5].detach())]
    assert math.isnan(got[0]) and got[1:].tolist() == want[1:]
    assert stack_scalars(values).dtype == torch.float64 and stack_scalars(values)[2] == 2**40 + 3


def test_clipping_in_the_step_is_torchs_clip_then_step():
    """saekit.train.optim.clip_in_step (the scale handed to fused Adam as its grad_scale) returns
    torch's total norm and moves every parameter as torch.nn.utils.clip_grad_norm_ followed by the
    same Adam step does, above the limit and below it, over three steps (Adam's state too), a
    parameter without a gradient left alone."""
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
            assert float(opt_p.grad_scale) >= 1.0 and (float(opt_p.grad_scale) > 1.0) == (
                float(total) > max_norm
            )
            opt_p.step()
            opt_q.step()
            for p, q in zip(ps, qs):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
        assert ps[3].grad is None and torch.equal(ps[3].detach(), qs[3].detach())
    drop_grads(ps)
    assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_sync_free_thresholded_training_equals_exact_training(arch, toy_x, monkeypatch):
    """JumpReLU and ReLU-L1 runs whose entries are found without read-backs (slots from the previous
    step's density, read back with the trainer's flags) end with the weights and log of exact runs;
    a step whose slots were too few (here: the density hint spoilt) is flagged and redone
    exactly."""
    import saekit.sae.fast.paths as paths

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)  # the sparse path at toy size
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    cfg = SAEConfig(arch=arch, d_in=16, d_sae=64, target_l0=3, l1_coeff=1.0)
    found = []
    entries = paths.entries
    monkeypatch.setattr(
        paths,
        "entries",
        lambda a, bound, step, plan: found.append(e := entries(a, bound, step, plan)) or e,
    )

    def spoil(tr):
        tr.hints[0].previous_density = 0.0  # 1,024 slots: too few

    def run(sync_free, spoil_at=None):
        return _steps(cfg, toy_x, sync_free, batch=512, steps=10, spoil_at=spoil_at, spoil=spoil)

    exact = run(False)
    assert all(e.valid is None for e in found)
    found.clear()
    free = run(True, spoil_at=5)
    # steps 1-9 (step 0 has no density yet)
    flags = [bool(e.exact) for e in found if e.exact is not None]
    assert len(flags) == 9 and flags.count(False) == 1 and not flags[4]
    assert sum(e.exact is None for e in found) == 2  # step 0, and step 5 redone exactly
    assert int(found[-1].count) > 1024
    for k, v in exact.saes[0].state_dict().items():
        assert torch.equal(v, free.saes[0].state_dict()[k]), k
    pd.testing.assert_frame_equal(exact.log_frames()[0], free.log_frames()[0])


def test_jumprelu_chooses_its_path_from_the_previous_steps_density_and_resumes_with_it(
    toy_x, tmp_path, monkeypatch
):
    """JumpReLU's fast path estimates the code's density from the previous step's sparse path (no
    probe encode of 128 rows, no read-back) once it has one; checkpoints keep that density (and
    BatchTopK's previous cut), so a resumed run chooses its steps' paths as the uninterrupted run
    does, and ends with its weights."""
    import saekit.sae.fast.paths as paths

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)  # the sparse path at toy size
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    from saekit.sae import SAE
    from saekit.train import checkpoints

    probes = []
    pre_acts = SAE.pre_acts
    monkeypatch.setattr(
        SAE, "pre_acts", lambda self, x, *xc: probes.append(x.shape[0]) or pre_acts(self, x, *xc)
    )
    cfgs = [
        SAEConfig(arch="jumprelu", d_in=16, d_sae=64, target_l0=3),
        SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3),
    ]
    tc = TrainConfig(
        total_tokens=256 * 8, batch_size=256, warmup_steps=1, progress=False, checkpoint_every=4
    )
    whole = train(toy_x, cfgs, tc, out=tmp_path / "a")
    # step 0's probe only: the later steps know the previous step's density
    assert probes.count(128) == 1
    hints = checkpoints.progress(checkpoints.latest(tmp_path / "a" / "checkpoints"))["hints"]
    assert hints[0]["previous_density"] > 0 and hints[1]["previous_cut"] > 0

    def crash(trainer, stats):
        if trainer.step == 6:
            raise KeyboardInterrupt  # resumed from the checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        train(toy_x, cfgs, tc, out=tmp_path / "b", callback=crash)
    probes.clear()
    resumed = train(toy_x, cfgs, tc, out=tmp_path / "b")
    # the checkpoint's density: no probe at the first resumed step either
    assert probes.count(128) == 0
    for w, r in zip(whole.saes, resumed.saes):
        for k, v in w.state_dict().items():
            assert torch.equal(v, r.state_dict()[k]), k


def test_a_selection_that_stays_inexact_when_redone_is_an_error(toy_x, monkeypatch):
    """The trainer redoes a step whose selection was not exact once; a selection that ignores
    Plan(exact=True) would leave an inexact step in training, so it stops with an error that
    names the SAE and the rule."""
    import saekit.sae.fast.paths as paths
    from saekit.train import Trainer

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)
    tr = Trainer(
        [SAEConfig(arch="topk", d_in=16, d_sae=64, k=3)],
        TrainConfig(total_tokens=10**6, batch_size=128, progress=False),
    )
    tr.initialise(toy_x[:512])
    real = paths.top_entries
    monkeypatch.setattr(paths, "top_entries", lambda *args: (real(*args)[0], torch.tensor(False)))
    with pytest.raises(TrainingError, match="not exact even when redone"):
        tr.train_step(toy_x[:128])
