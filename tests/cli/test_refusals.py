"""The second bad-input round: outputs that would overlap their inputs, comparisons of unrelated
evaluations, resumes with a changed schedule, numbers that are not finite, devices that are not
here, and Ctrl-C. Each refusal asserts exit code 2 (130 for Ctrl-C), the message and that nothing
already written changed."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from bad_input import ENV, ROOT, cli, copy, refused, run, snapshot
from conftest import HOOK

import saekit.cli.commands
from saekit.jobs.notebooks import notebooks_source


@pytest.fixture
def acts(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((1024, 16)).astype(np.float32))
    return path


TRAIN = ("--k", 4, "--expansion", 2, "--tokens", 1024, "--batch-size", 128)


# -- outputs never overlap inputs --------------------------------------------------------------


def test_an_export_cannot_eat_its_store(my_store, tmp_path):
    before = snapshot(my_store)
    refused(run("export-store", my_store, my_store, "--overwrite"), "is the store")
    refused(run("export-store", my_store, my_store / "cache"), "lies inside the store")
    refused(run("export-store", my_store, tmp_path, "--overwrite"), "holds the store")
    assert snapshot(my_store) == before


def test_training_and_sweeps_write_apart_from_their_data(store, my_store, acts, tmp_path):
    before = snapshot(my_store)
    refused(run("train", "--store", my_store, "--out", my_store, *TRAIN), "is the training data")
    refused(run("train", "--store", my_store, "--out", my_store / "run", *TRAIN), "lies inside")
    refused(run("train", "--store", acts, "--out", acts, *TRAIN), "is the training data")
    refused(run("train", "--store", my_store, "--out", tmp_path, *TRAIN), "holds the training")
    args = ("--no-ce", "--k", 8, "--arch", "batchtopk", "--tokens", 512, "--batch-size", 256)
    sweep = run("sweep", "--store", store.path, "--eval-store", my_store, "--out", my_store, *args)
    refused(sweep, "is the evaluation store")
    assert snapshot(my_store) == before
    assert not (my_store / "run").exists()


def test_capture_bench_eval_and_notebooks_write_apart_from_their_inputs(my_store, my_sae, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.txt").write_text("Some text.\n\nMore text here.\n")
    refused(
        run("capture", "--hook", HOOK, "--corpus", corpus, "--out", corpus / "store"),
        "lies inside the corpus",
    )
    assert sorted(p.name for p in corpus.iterdir()) == ["docs.txt"]
    before = snapshot(my_sae, my_store, notebooks_source())
    refused(run("bench", my_sae, "--out", my_sae / "bench"), "lies inside the SAE folder 1")
    refused(
        run("eval", my_sae, "--store", my_store, "--no-ce", "--out", my_store / "e.json"),
        "lies inside the store",
    )
    refused(run("notebooks", notebooks_source(), "--overwrite"), "is the notebook series")
    assert snapshot(my_sae, my_store, notebooks_source()) == before


# -- comparisons refuse unrelated runs ---------------------------------------------------------


def _evaluation(sae, store, out, *args):
    r = run("eval", sae, "--store", store, "--no-ce", "--out", out, *args)
    assert r.returncode == 0, r.stderr
    return out


def test_compare_pairs_only_evaluations_of_one_store_hook_and_mode(store, sae_dir, tmp_path):
    a = _evaluation(sae_dir, store.path, tmp_path / "a.json")
    # a copy of the store elsewhere is the same data: its sequences pair up
    moved = copy(store.path, tmp_path / "moved")
    same = _evaluation(sae_dir, moved, tmp_path / "same.json", "--tokens", 500)
    r = run("compare", a, same)
    assert r.returncode == 0, r.stderr
    assert "nmse" in r.stdout and "sequences)" in r.stdout
    # the same tokens exported as a SAELens cache of 50-token rows leave a tail out: other data
    exported = run("export-store", store.path, tmp_path / "cache", "--context-size", 50)
    assert exported.returncode == 0, exported.stderr
    other = _evaluation(sae_dir, tmp_path / "cache", tmp_path / "other.json")
    batch = _evaluation(sae_dir, store.path, tmp_path / "batch.json", "--mode", "batch")
    hook = _evaluation(
        sae_dir, store.path, tmp_path / "hook.json", "--hook", "mlp_out.3", "--allow-mismatch"
    )
    before = snapshot(tmp_path)
    refused(run("compare", a, other), "do not pair up", "data n_rows", "--allow-mismatch")
    refused(run("compare", a, batch), "mode: threshold in A, batch in B")
    refused(run("compare", a, hook), f"hook: {HOOK} in A, mlp_out.3 in B")
    r = run("compare", a, batch, "--allow-mismatch")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("unpaired (mode") and "−" not in r.stdout  # no difference drawn
    assert snapshot(tmp_path) == before


def test_compare_names_too_few_sequences_and_files_that_are_not_evaluations(
    store, sae_dir, tmp_path
):
    a = _evaluation(sae_dir, store.path, tmp_path / "a.json", "--tokens", 40)
    b = _evaluation(sae_dir, store.path, tmp_path / "b.json", "--tokens", 40)
    refused(run("compare", a, b), "made on 1 sequence(s)", "at least 2")
    refused(run("compare", a, store.path / "manifest.json"), "is not a saekit evaluation")
    (tmp_path / "junk.json").write_bytes(b"\x00\xff")
    refused(run("compare", a, tmp_path / "junk.json"), "junk.json is corrupt")


# -- resume refuses what it cannot honour ------------------------------------------------------


def test_resume_refuses_a_changed_schedule_or_precision(acts, tmp_path):
    out = tmp_path / "run"
    base = ("train", "--store", acts, "--out", out, *TRAIN, "--checkpoint-every", 4)
    assert run(*base).returncode == 0
    before = snapshot(out)
    refused(run(*base, "--lr", 1e-3), "--lr (each SAE's learning rate)", "then", "[0.001] now")
    refused(run(*base, "--warmup-steps", 3), "--warmup-steps: 100 then, 3 now")
    refused(run(*base, "--precision", "bf16"), "--precision", "['fp32'] then, ['bf16'] now")
    assert snapshot(out) == before


def test_speed_settings_may_change_and_each_segment_is_recorded(acts, tmp_path):
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train

    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=32, k=4)
    settings = dict(total_tokens=1024, batch_size=128, checkpoint_every=4, progress=False)

    def crash(trainer, stats):
        if trainer.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(acts, cfg, TrainConfig(**settings), out=tmp_path / "run", callback=crash)
    train(acts, cfg, TrainConfig(**settings, step_graphs="eager", fast=False), out=tmp_path / "run")
    segments = json.loads((tmp_path / "run" / "train_config.json").read_text())["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 4), (4, 8)]
    assert [(s["step_graphs"], s["fast"]) for s in segments] == [("off", True), ("eager", False)]


# -- numbers and devices -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_numbers_that_are_not_finite_are_refused_by_every_flag(
    store, sae_dir, acts, tmp_path, value
):
    out = tmp_path / "out"
    for args, flag in (
        (("calibrate", sae_dir, "--store", store.path, "--target-l0", value), "--target-l0"),
        (("train", "--store", acts, "--out", out, "--lr", value), "--lr"),
        (("train", "--store", acts, "--out", out, "--l1-coeff", value), "--l1-coeff"),
        (("train", "--store", acts, "--out", out, "--enc-init-norm", value), "enc-init-norm"),
        (("demo", "--out", out, "--lr", value), "--lr"),
    ):
        refused(run(*args), flag, value)
    assert not out.exists()


MISSING = ["gpu0", "cuda:99", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", MISSING)
def test_a_device_that_is_not_here_is_refused_before_any_folder(
    store, sae_dir, acts, tmp_path, device
):
    out = tmp_path / "out"
    for args in (
        ("capture", "--hook", HOOK, "--out", out),
        ("train", "--store", acts, "--out", out, *TRAIN),
        ("eval", sae_dir, "--store", store.path, "--no-ce"),  # unused without the CE metrics
        ("demo", "--out", out),
    ):
        refused(run(*args, "--device", device), f"device '{device}'", "available here: cpu")
    assert not out.exists()


# -- Ctrl-C ------------------------------------------------------------------------------------


LONG = ["capture", "train", "sweep", "demo", "bench", "export-store", "calibrate", "eval"]


@pytest.mark.parametrize("command", LONG)
def test_ctrl_c_ends_every_long_command_with_one_line(monkeypatch, command):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(saekit.cli.commands, f"cmd_{command.replace('-', '_')}", interrupted)
    args = {
        "capture": ["--hook", HOOK, "--out", "x"],
        "train": ["--store", "x", "--out", "x"],
        "sweep": ["--store", "x", "--out", "x"],
        "demo": [],
        "bench": ["x"],
        "export-store": ["x", "y"],
        "calibrate": ["x", "--store", "x"],
        "eval": ["x", "--store", "x"],
    }[command]
    r = run(command, *args)
    assert r.returncode == 130
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"saekit {command}: interrupted; ")


def _interrupt_when(cmd: list, ready, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `saekit CMD`, send it SIGINT once ready() holds, and return how it ended."""
    p = subprocess.Popen(
        [sys.executable, "-m", "saekit", *map(str, cmd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout
    while not ready() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def test_ctrl_c_during_a_capture_keeps_its_shards_and_the_rerun_completes(tmp_path):
    out = tmp_path / "store"
    cmd = ["capture", "--hook", HOOK, "--tokens", 8000, "--seq-len", 64, "--shard-tokens", 640]
    r = _interrupt_when([*cmd, "--out", out], lambda: any(out.glob("shards/*.done.json")))
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"saekit capture: interrupted; the shards finished so far are kept in {out}; run the same "
        "command to resume"
    )
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert cli(*cmd, "--out", out).returncode == 0
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_ctrl_c_during_training_names_the_checkpoint_kept(tmp_path):
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((4096, 16), np.float32))
    out = tmp_path / "run"
    cmd = ["train", "--store", tmp_path / "acts.npy", "--out", out, "--k", 4, "--expansion", 2]
    cmd += ["--tokens", 10**8, "--batch-size", 128, "--checkpoint-every", 20]
    r = _interrupt_when(cmd, lambda: any(out.glob("checkpoints/step_*")))
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("saekit train: interrupted; the checkpoint at step ")
    assert last.endswith("run the same command to resume from it")
