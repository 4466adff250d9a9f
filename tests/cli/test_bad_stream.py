"""The bad-input suite for training from the running model: each case exits 2 with one line that
names the problem and the fix, before anything is written; a split that runs out goes on with
another pass, and says so."""

import warnings

import pytest
from bad_input import refused, run

STREAM = ["train", "--model", "embedded", "--tokens", 2048, "--batch-size", 256]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--store", "somewhere", "--hook", "resid_post.2"], ["--store and --model", "not both"]),
        ([], ["--model needs", "--hook"]),
        (["--hook", "resid_post.2", "--hook", "resid_post.2"], ["resid_post.2", "twice"]),
        (["--hook", "resid_pots.2"], ["resid_pots.2", "nearest", "resid_post.2"]),
        (["--hook", "resid_post.99"], ["layer 99", "30 layers"]),
        (["--hook", "resid_post.2", "--corpus", "no/such/corpus.jsonl"], ["no/such/corpus.jsonl"]),
        (["--hook", "resid_post.2", "--split", "validation"], ["validation", "'train'"]),
        (["--hook", "resid_post.2", "--text-field", "nope"], ["'nope'", "--text-field"]),
    ],
)
def test_a_stream_that_cannot_start_is_refused_before_anything_is_written(tmp_path, args, words):
    out = tmp_path / "out"
    refused(run(*STREAM, "--out", out, *args), *words)
    assert not out.exists() or not any(out.iterdir())


def test_neither_a_store_nor_a_model_is_refused(tmp_path):
    refused(run("train", "--out", tmp_path / "o"), "no data", "--store", "--model")


def test_a_split_that_runs_out_goes_on_with_another_pass_and_says_so(model, tmp_path):
    """A corpus smaller than the run: training goes on over the split again in a new order (the
    choice written in docs/stream.md), with a warning naming the split."""
    import itertools

    from saekit.train.stream import ModelSource

    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(f'{{"text": "short document number {i}."}}\n' for i in range(40)))
    source = ModelSource(model, "resid_post.2", corpus=str(corpus), split="all", window_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(itertools.islice(source.batches(64), 6))
    assert len(batches) == 6
    used_up = [str(w.message) for w in caught if "used up" in str(w.message)]
    assert used_up and "pass 2" in used_up[0] and "small.jsonl" in used_up[0]


def test_a_stream_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL after the first checkpoint, then the same command: the run resumes from the
    stream's recorded position and ends at the weights of a run never interrupted (CPU)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bad_input import ENV, ROOT
    from safetensors.torch import load_file

    args = [*map(str, STREAM), "--hook", "resid_post.2", "--k", "8", "--expansion", "2",
            "--window-batches", "3", "--checkpoint-every", "2"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(*args, "--out", whole).returncode == 0
    cmd = [sys.executable, "-m", "saekit", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((killed / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert done and done[-1] != "step_00000008"  # killed before the end
    assert run(*args, "--out", killed).returncode == 0
    name = next(p.name for p in whole.iterdir() if p.name.startswith("batchtopk"))
    a = load_file(str(whole / name / "sae_weights.safetensors"))
    b = load_file(str(killed / name / "sae_weights.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)
