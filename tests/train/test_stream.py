"""Training straight from the running model (saekit.train.stream.ModelSource): the stream's
batches, its position and lanes, SAEs at several hooks from one forward, and a resume that ends at
the uninterrupted run's weights."""

import itertools
import json

import pytest
import torch

from saekit.data.corpus import sample_documents
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, TrainingError, train
from saekit.train.stream import ModelSource

HOOKS = ["resid_post.2", "resid_post.4"]


def _take(source, n, **kw):
    return list(itertools.islice(source.batches(64, **kw), n))


def test_a_position_gives_back_the_batches_that_followed_it(model):
    """position(step) is a few numbers per lane; batches(position=..., skip_batches=step) from a
    fresh source rebuilds that window with the model and serves the same batches, bit for bit,
    at every hook."""
    source = ModelSource(model, HOOKS, window_batches=3)
    first = _take(source, 8, seed=1)
    assert set(first[0]) == set(HOOKS) and first[0][HOOKS[0]].shape == (64, 576)
    assert not torch.equal(first[0][HOOKS[0]], first[0][HOOKS[1]])
    for step in (3, 5):  # a window's first batch, and one inside a window
        pos = source.position(step, seed=1)
        json.dumps(pos)  # it goes into a checkpoint's state.json
        again = _take(ModelSource(model, HOOKS, window_batches=3), 8 - step, seed=1,
                      skip_batches=step, position=pos)  # fmt: skip
        assert all(torch.equal(a[h], b[h]) for a, b in zip(first[step:], again) for h in HOOKS)
    other_seed = _take(source, 1, seed=2)[0]
    assert not torch.equal(other_seed[HOOKS[0]], first[0][HOOKS[0]])


def test_one_process_with_two_lanes_serves_what_two_ranks_do(model):
    """Lane r reads every other document: two ranks each stream their own documents, and one
    process given lanes=2 serves their batches side by side (the same global batches)."""
    one = list(itertools.islice(ModelSource(model, "resid_post.2", lanes=2,
                                            window_batches=2).batches(64), 3))  # fmt: skip
    ranks = [
        list(
            itertools.islice(
                ModelSource(model, "resid_post.2", window_batches=2).batches(
                    32, rank=r, world_size=2
                ),
                3,
            )
        )  # fmt: skip
        for r in (0, 1)
    ]
    assert all(torch.equal(o, torch.cat([a, b])) for o, a, b in zip(one, *ranks))
    assert not torch.equal(ranks[0][0], ranks[1][0])
    with pytest.raises(TrainingError, match="1 process or 2 ranks"):
        next(ModelSource(model, "resid_post.2", lanes=2).batches(32, rank=0, world_size=3))


def _cfgs():
    return [
        SAEConfig(arch=a, d_in=576, d_sae=1152, k=16, hook_name=h)
        for h in HOOKS
        for a in ("batchtopk", "topk")
    ]


def _tc():
    return TrainConfig(
        total_tokens=256 * 20,
        batch_size=256,
        warmup_steps=2,
        progress=False,
        checkpoint_every=8,
        init_tokens=512,
        calibrate_batches=2,
    )


def test_a_run_from_the_model_trains_every_hook_and_resumes_to_the_same_weights(model, tmp_path):
    """Four SAEs at two hooks from one forward a step; a run interrupted inside a window resumes
    from its last checkpoint (the stream's position in it) and ends at the uninterrupted run's
    weights, bit for bit on the CPU. Nothing but checkpoints and SAEs is written."""

    def source():
        return ModelSource(model, HOOKS, window_batches=3)

    whole = train(source(), _cfgs(), _tc(), out=tmp_path / "a")
    assert whole.steps == 20 and whole.tokens == 5120
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [".saekit.lock", "checkpoints", "train_config.json", *whole.names]
    )
    assert len(set(whole.names)) == 4 and all(any(h in n for h in HOOKS) for n in whole.names)
    state = json.loads((tmp_path / "a" / "checkpoints" / "step_00000020/state.json").read_text())
    # the last checkpoint's position is step 20's (θ's batches, read after, do not move it)
    assert state["stream"]["lanes"]["0"]["window"] == 20 // 3
    assert state["stream"]["lanes"]["0"]["served"] == 20 % 3

    def crash(trainer, stats):
        if trainer.step == 13:  # inside a window, after the checkpoint at step 8
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(source(), _cfgs(), _tc(), out=tmp_path / "b", callback=crash)
    resumed = train(source(), _cfgs(), _tc(), out=tmp_path / "b")
    for w, r in zip(whole.saes, resumed.saes):
        for k, v in w.state_dict().items():
            assert torch.equal(v, r.state_dict()[k]), k


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(hooks=["resid_post.2", "resid_post.5"]), "the stream's hooks"),
        (dict(split="all"), "the stream's split"),
        (dict(seq_len=64), "the stream's seq_len"),
    ],
)
def test_a_resume_with_another_stream_is_refused_naming_the_difference(
    model, tmp_path, change, named
):
    tc = TrainConfig(total_tokens=256 * 4, batch_size=256, progress=False, checkpoint_every=2,
                     init_tokens=256, calibrate_batches=1)  # fmt: skip
    cfgs = [SAEConfig(arch="batchtopk", d_in=576, d_sae=1152, k=16, hook_name=h) for h in HOOKS]

    def crash(trainer, stats):
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(ModelSource(model, HOOKS, window_batches=2), cfgs, tc, out=tmp_path, callback=crash)
    kw = {"hooks": HOOKS, "window_batches": 2, **change}
    cfgs = [
        SAEConfig(arch="batchtopk", d_in=576, d_sae=1152, k=16, hook_name=h) for h in kw["hooks"]
    ]
    with pytest.raises(TrainingError, match=named):
        train(ModelSource(model, **kw), cfgs, tc, out=tmp_path)


def test_the_start_is_drawn_from_the_first_window_which_runs_once(model, tmp_path, monkeypatch):
    """The start's sample comes from the documents the run trains on first, training serves that
    window without running the model on it again, and θ's final batches are that window's rows in
    another order, kept: one window's forward for all three, and no larger than the run."""
    fills = []
    real = ModelSource._fill
    monkeypatch.setattr(
        ModelSource, "_fill", lambda self, *a: fills.append(a[-1]) or real(self, *a)
    )
    tc = TrainConfig(total_tokens=256 * 4, batch_size=256, progress=False, init_tokens=512,
                     calibrate_batches=2)  # fmt: skip
    cfg = SAEConfig(arch="batchtopk", d_in=576, d_sae=1152, k=16, hook_name=HOOKS[0])
    res = train(ModelSource(model, HOOKS[0]), [cfg], tc, out=tmp_path)
    # the default window (131,072 tokens) is cut to the run's 4 batches: no forward past the run
    assert res.steps == 4 and fills == [4]


def test_a_stream_reads_the_documents_a_capture_of_its_seed_packs(model):
    """The first pass over the split is in capture's order: a store captured with the same seed
    holds the tokens the stream trains on (results/stream_mixing compares the two)."""
    source = ModelSource(model, HOOKS[0])
    docs = source._documents(0, 1, 3, {"pass": 0, "read": 0})
    order, _ = sample_documents(source.ds, seed=3)
    assert [d for d, *_ in itertools.islice(docs, 40)] == [
        d for d, _ in itertools.islice(order, 40)
    ]


def test_the_batches_kept_for_theta_are_what_a_fresh_call_serves(model):
    """θ's batches, kept while training reads the first window, are the ones a stream rebuilt
    after a resume serves: the same rows in the same order, another order than training's."""
    source = ModelSource(model, "resid_post.2", window_batches=3)
    training = list(itertools.islice(source.batches(64, seed=2, keep_calibration=2), 3))
    kept = list(itertools.islice(source.batches(64, **source.sample("calibrate", 2)), 3))
    fresh = ModelSource(model, "resid_post.2", window_batches=3)
    rebuilt = list(itertools.islice(fresh.batches(64, **fresh.sample("calibrate", 2)), 3))
    assert all(torch.equal(a, b) for a, b in zip(kept, rebuilt))
    assert not torch.equal(kept[0], training[0])
    assert torch.equal(torch.cat(kept).sort(0).values, torch.cat(training).sort(0).values)
