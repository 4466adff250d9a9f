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
