"""The training step recorded once and replayed (saekit.train.graphs, TrainConfig.step_graphs). CUDA
graphs need a GPU; here the same phases run unrecorded (step_graphs="eager") and are checked for
what a recording needs: they train to the eager trainer's weights, and every step dispatches the
same operators with the same arguments, none of which waits for the device."""

import warnings

import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import saekit.sae.fast.paths as paths
from saekit.sae import SAE, SAEConfig, Step
from saekit.sae.fast import auxk, slots
from saekit.toy import make_toy
from saekit.train import TrainConfig, Trainer, TrainingError, graphs, train


@pytest.fixture(scope="module")
def toy_x():
    return make_toy(n_samples=6000, d=16, n_features=48, mean_active=3, seed=1).x


def _run(cfg, toy_x, mode, steps=14, spoil_at=None, **tc):
    torch.manual_seed(0)
    # the eager run's selection without read-backs too (sync_free): the same selections
    tr = Trainer(
        [cfg],
        TrainConfig(
            total_tokens=10**6,
            batch_size=128,
            warmup_steps=4,
            progress=False,
            log_every=1,
            step_graphs=mode,
            sync_free=True,
            **tc,
        ),
    )
    tr.initialise(toy_x[:512])
    for i in range(steps):
        # a hint so high that the selection cannot be proven exact: the step is redone
        if i == spoil_at:
            tr.hints[0].previous_cut *= 100
        tr.train_step(toy_x[i * 128 : (i + 1) * 128])
    return tr


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "jumprelu", "relu", "matryoshka"])
def test_recordable_step_trains_to_the_eager_trainers_weights(
    arch, toy_x, sparse_everywhere, monkeypatch
):
    """14 steps with warmup (a rate that changes every step), dead latents and AuxK (in fixed slots,
    padded), theta, and for BatchTopK one step whose hint is spoilt and which is redone: the
    weights, theta, counters and log of the recordable phases equal the eager trainer's (AuxK's
    padded slots change a matmul's summation order, so to float32 rounding)."""
    room = []
    dead_latents = auxk.dead_latents
    monkeypatch.setattr(
        auxk,
        "dead_latents",
        lambda sae, step, plan, pad: (
            room.append(plan.aux_slots) or dead_latents(sae, step, plan, pad)
        ),
    )
    cfg = SAEConfig(
        arch=arch,
        d_in=16,
        d_sae=64,
        k=3,
        target_l0=3,
        l1_coeff=1.0,
        dead_tokens=256,
        group_sizes=[16, 16, 32] if arch == "matryoshka" else None,
    )
    spoil = 8 if arch == "batchtopk" else None
    eager = _run(cfg, toy_x, "off", spoil_at=spoil)
    room.clear()
    rec = _run(cfg, toy_x, "eager", spoil_at=spoil)
    assert isinstance(rec.graphed[0], graphs.GraphedStep) and eager.graphed[0] is None
    if eager.saes[0].uses_auxk:
        assert 64 in room  # the padded slots ran
    for k, v in eager.saes[0].state_dict().items():
        torch.testing.assert_close(rec.saes[0].state_dict()[k], v, msg=k)
    log_e, log_r = eager.log_frames()[0], rec.log_frames()[0]
    if eager.saes[0].uses_auxk:  # AuxK had dead latents to use
        assert (log_e["aux"] > 0).any() and (log_e["dead_frac"] > 0).any()
    assert list(log_r.columns) == list(log_e.columns)
    pd.testing.assert_frame_equal(log_r, log_e, check_exact=False, rtol=1e-5)
    if arch == "batchtopk":  # the hint lives on the device, the theta update too
        assert rec.hints[0].previous_cut is rec.graphed[0].hint and float(rec.saes[0].threshold) > 0


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "matryoshka"])
def test_a_dense_step_with_auxk_trains_to_the_eager_trainers_weights(arch, toy_x, monkeypatch):
    """A step too dense for the sparse path runs phase A unrecorded on the reference path, whose
    AuxK finds the dead latents itself (a recorded step's AuxK slots belong to the speed layer and
    never reach it; padding once read as the last latent there): the eager trainer's weights."""
    # recordable in principle, but every step too dense for it
    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 0.01)
    seen = []
    ref = SAE.reference_loss
    monkeypatch.setattr(
        SAE,
        "reference_loss",
        lambda self, x, step=Step(): seen.append(step.aux) or ref(self, x, step),
    )
    cfg = SAEConfig(
        arch=arch,
        d_in=16,
        d_sae=64,
        k=3,
        dead_tokens=256,
        group_sizes=[16, 16, 32] if arch == "matryoshka" else None,
    )
    eager = _run(cfg, toy_x, "off")
    seen.clear()
    rec = _run(cfg, toy_x, "eager")
    # dense steps with AuxK, on the reference path
    assert isinstance(rec.graphed[0], graphs.GraphedStep) and True in seen
    assert (eager.log_frames()[0]["aux"] > 0).any()
    for k, v in eager.saes[0].state_dict().items():
        torch.testing.assert_close(rec.saes[0].state_dict()[k], v, msg=k)
    pd.testing.assert_frame_equal(
        rec.log_frames()[0], eager.log_frames()[0], check_exact=False, rtol=1e-5
    )


class OperatorLog(TorchDispatchMode):
    """Each operator dispatched with its arguments as a recording would freeze them: tensors by
    shape, dtype and device, everything else by value."""

    def __init__(self):
        super().__init__()
        self.ops = []

    @staticmethod
    def _frozen(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), a.dtype, a.device.type)
        if isinstance(a, (list, tuple)):
            return tuple(OperatorLog._frozen(b) for b in a)
        if isinstance(
            a, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout)
        ):
            return a
        return type(a).__name__  # the profiler's record_function handles

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(
            (
                str(func),
                self._frozen(args),
                tuple(sorted((k, self._frozen(v)) for k, v in kwargs.items())),
            )
        )
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "jumprelu", "relu", "matryoshka"])
def test_every_step_dispatches_the_same_operators_and_none_waits(
    arch, toy_x, sparse_everywhere, monkeypatch
):
    """What a CUDA graph records is one run's operators with their arguments (after WARMUP runs);
    later steps replay them. So every step of the same phase (same AuxK slots) after the warmup must
    dispatch the same operators with the same arguments (the rate, the hint and the dead count
    change between them, and must do so in tensors), no operator may wait for the device, and the
    tensors the phases hand on (gradients, hint, counters) must stay the same objects."""
    seen: dict = {}
    run = graphs.GraphedStep._run

    def logged(self, key, phase):
        log = OperatorLog()
        with log:
            run(self, key, phase)
        seen.setdefault(key, []).append(log.ops)

    monkeypatch.setattr(graphs.GraphedStep, "_run", logged)
    cfg = SAEConfig(
        arch=arch,
        d_in=16,
        d_sae=64,
        k=3,
        target_l0=3,
        l1_coeff=1.0,
        dead_tokens=256,
        group_sizes=[16, 16, 32] if arch == "matryoshka" else None,
    )
    torch.manual_seed(0)
    tr = Trainer(
        [cfg],
        TrainConfig(
            total_tokens=10**6, batch_size=128, warmup_steps=6, progress=False, step_graphs="eager"
        ),
    )
    tr.initialise(toy_x[:512])
    tr.train_step(toy_x[:128])  # BatchTopK's first step is eager: it makes the first hint
    step = tr.graphed.ready(0, tr.saes[0], tr.opts[0], 128, 128, False, 1, tr.hints[0], None)
    sae = tr.saes[0]
    grads = [p.grad for p in sae.parameters()]
    lrs = []
    for i in range(1, 12):
        lrs.append(float(tr.opts[0].param_groups[0]["lr"]))
        tr.train_step(toy_x[i * 128 : (i + 1) * 128])
    assert len(set(lrs)) > 3  # the rate changed during the steps compared
    # AuxK ran in some
    assert ("B",) in seen and any(k[1] > 0 for k in seen if k[0] == "A") == sae.uses_auxk
    w = graphs.WARMUP  # runs before the recording (lazy set-up: Adam's state on its first step)
    assert len(seen[("B",)]) > w + 2 and max(len(r) for k, r in seen.items() if k[0] == "A") > w + 2
    for key, runs in seen.items():
        for ops in runs[w + 1 :]:
            assert ops == runs[w], (
                f"phase {key} dispatched different operators or arguments from step to step"
            )
        names = {op[0].split(".")[1] for run in runs for op in run}
        waits = names & {
            "_local_scalar_dense",
            "nonzero",
            "is_nonzero",
            "equal",
            "masked_select",
            "unique",
            "bincount",
            "item",
        }
        assert not waits, f"phase {key} waits for the device: {waits}"
    assert all(p.grad is g for p, g in zip(sae.parameters(), grads))
    if sae.has_theta:
        assert tr.hints[0].previous_cut is step.hint


def test_step_graphs_refuses_what_it_cannot_record(toy_x, sparse_everywhere, monkeypatch):
    """An SAE whose step reads back (the reference path, fast=False; a dictionary too small for the
    sparse path) trains on the eager step with a warning; "cuda" off a GPU, or an unknown mode,
    is an error that names the fix."""
    cfgs = [
        SAEConfig(arch="matryoshka", d_in=16, d_sae=64, k=3, group_sizes=[16, 48]),
        SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3),
        SAEConfig(arch="jumprelu", d_in=16, d_sae=64, k=3),
    ]
    tc = TrainConfig(
        total_tokens=128 * 4, batch_size=128, warmup_steps=1, progress=False, step_graphs="eager"
    )

    def warned(cfgs):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            res = train(toy_x, cfgs, tc)
        assert res.steps == 4 and all(len(log) for log in res.logs)
        return [str(w.message) for w in got if "step_graphs" in str(w.message)]

    assert warned(cfgs) == []  # every architecture records its step
    tc.fast = False
    said = warned(cfgs[1:2])
    assert len(said) == 1 and "the reference path (fast=False) reads values back" in said[0]
    tc.fast = True
    # d_sae 64: the dense path, which reads back
    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 512)
    said = warned(cfgs)
    assert len(said) == 3 and all(
        "at d_sae 64 the step takes the dense reference path" in m for m in said
    )
    with pytest.raises(TrainingError, match="step_graphs='off'"):
        train(
            toy_x,
            [cfgs[2]],
            TrainConfig(
                total_tokens=128 * 3,
                batch_size=128,
                progress=False,
                step_graphs="cuda",
                device="cpu",
            ),
        )
    with pytest.raises(TrainingError, match="unknown step_graphs"):
        train(
            toy_x,
            [cfgs[2]],
            TrainConfig(total_tokens=128 * 3, batch_size=128, progress=False, step_graphs="on"),
        )


def test_one_slot_rule_sizes_every_fixed_shape():
    """fast.slots, for AuxK's dead latents and (through entry_slots) a code's entries: room for n,
    on a grid of 8 to 16 sizes an octave (multiples of the unit), so a count that drifts keeps its
    shape and a run meets a few dozen shapes; capped; 0 for none."""
    assert slots(0, 64, 4096) == 0
    got = [slots(n, 64, 10**6) for n in range(1, 20000)]
    assert all(n <= s < n + max(64, n / 8) and s % 64 == 0 for n, s in zip(range(1, 20000), got))
    assert len(set(got)) < 90 and slots(3000, 64, 3072) == 3072 and slots(5000, 1024, 4608) == 4608
    assert slots(1, 1024, 10**6) == 1024 and slots(1025, 1024, 10**6) == 2048


def test_a_recorded_step_that_meets_nan_stops_with_the_weights_of_its_start(
    toy_x, sparse_everywhere
):
    tr = _run(SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3), toy_x, "eager", steps=3)
    before = {k: v.clone() for k, v in tr.saes[0].state_dict().items()}
    bad = toy_x[:128].clone()
    bad[5, 2] = float("nan")
    with pytest.raises(TrainingError, match="input activations"):
        tr.train_step(bad)
    for k, v in before.items():
        assert torch.equal(tr.saes[0].state_dict()[k], v), k


def test_a_recorded_run_resumes_to_the_uninterrupted_weights(toy_x, tmp_path, sparse_everywhere):
    """Checkpoints keep the hint as a number; a resumed run records its step anew and ends as the
    whole run."""
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=3, dead_tokens=256)
    tc = TrainConfig(
        total_tokens=128 * 12,
        batch_size=128,
        warmup_steps=2,
        progress=False,
        checkpoint_every=5,
        step_graphs="eager",
    )
    whole = train(toy_x, [cfg], tc, out=tmp_path / "a")

    def crash(trainer, stats):
        if trainer.step == 7:
            raise KeyboardInterrupt  # resumed from the checkpoint at step 5

    with pytest.raises(KeyboardInterrupt):
        train(toy_x, [cfg], tc, out=tmp_path / "b", callback=crash)
    resumed = train(toy_x, [cfg], tc, out=tmp_path / "b")
    for k, v in whole.saes[0].state_dict().items():
        assert torch.equal(v, resumed.saes[0].state_dict()[k]), k
