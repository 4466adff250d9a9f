"""The bad-input suite: each case runs the CLI as a user would and asserts exit code 2, no
traceback, a message that names the problem, and that nothing already written (store, SAE folder,
checkpoints) changed."""

import contextlib
import json
import os
import resource
import subprocess

import numpy as np
import pytest
from bad_input import cli, edit_json, refused
from conftest import HOOK


def test_train_checks_its_output_before_training(tmp_path):
    np.save(
        tmp_path / "acts.npy",
        np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32),
    )
    (tmp_path / "file").write_text("not a folder")
    args = [
        "train",
        "--store",
        tmp_path / "acts.npy",
        "--k",
        4,
        "--tokens",
        512,
        "--batch-size",
        128,
    ]
    refused(cli(*args, "--out", tmp_path / "file"), "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "not a folder"
    # a dictionary of 16 billion latents needs terabytes for its checkpoints: refused before it
    # takes any memory
    r = refused(
        cli(*args, "--expansion", 10**9, "--out", tmp_path / "huge"), "no space left on", "MB free"
    )
    assert "about" in r and "MB needed" in r
    assert not list((tmp_path / "huge").glob("*/cfg.json"))


@contextlib.contextmanager
def read_only(folder):
    """`folder` made read-only even for root (who writes through file modes): immutable, else a
    read-only bind mount; an ordinary user gets plain file modes."""
    undo = None
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        undo = ["chmod", "755", str(folder)]
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    elif (
        subprocess.run(
            ["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True
        ).returncode
        == 0
    ):
        undo = ["umount", str(folder)]
    try:
        with pytest.raises(OSError):  # the case is real: nothing can be written there
            (folder / "probe").write_text("x")
        yield folder
    finally:
        if undo:
            subprocess.run(undo, check=True)


def test_a_read_only_output_folder_is_refused(tmp_path):
    np.save(
        tmp_path / "acts.npy",
        np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32),
    )
    (tmp_path / "locked").mkdir()
    with read_only(tmp_path / "locked") as out:
        r = cli(
            "train",
            "--store",
            tmp_path / "acts.npy",
            "--k",
            4,
            "--tokens",
            512,
            "--batch-size",
            128,
            "--out",
            out,
        )
        refused(r, "cannot write in", "choose a writable folder")
    assert os.listdir(tmp_path / "locked") == []


def test_a_write_that_fails_mid_capture_is_a_message_and_resumable(tmp_path):
    limit = 300_000  # bytes a file may grow to: the tokens fit, the first shard does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "store"
    r = cli(
        "capture",
        "--hook",
        HOOK,
        "--tokens",
        1000,
        "--out",
        out,
        "--seq-len",
        64,
        preexec_fn=small_files,
    )
    refused(r, "ulimit")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == [] and not manifest["complete"]
    assert not list(out.glob("shards/*.npy"))
    r = cli("capture", "--hook", HOOK, "--tokens", 1000, "--out", out, "--seq-len", 64)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"]


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda s: (s / "manifest.json").write_bytes(os.urandom(300)),
            ["manifest.json is corrupt"],
        ),
        (lambda s: (s / "manifest.json").write_text("[1, 2]"), ["not an object"]),
        (
            lambda s: edit_json(s / "manifest.json", lambda m: m.pop("shards")),
            ["missing or malformed shards"],
        ),
        (
            lambda s: (s / "tokens.npy").write_bytes((s / "tokens.npy").read_bytes()[:200]),
            ["tokens.npy is truncated"],
        ),
        (
            lambda s: np.save(s / "doc_ids.npy", np.zeros((3, 5), np.int32)),
            ["doc_ids.npy holds", "(3, 5)"],
        ),
    ],
)
def test_a_damaged_store_is_refused(my_store, sae_dir, damage, words):
    damage(my_store)
    refused(cli("eval", sae_dir, "--store", my_store, "--no-ce"), *words)


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda d: (d / "cfg.json").write_text('"a string"'),
            ["cfg.json is corrupt", "not an object"],
        ),
        (lambda d: (d / "cfg.json").write_bytes(os.urandom(200)), ["cfg.json is corrupt"]),
        (
            lambda d: edit_json(d / "cfg.json", lambda c: c["saekit"].update(d_sae=2304)),
            ["does not fit", "W_enc"],
        ),
    ],
)
def test_a_damaged_sae_folder_is_refused(store, my_sae, damage, words):
    damage(my_sae)
    refused(cli("eval", my_sae, "--store", store.path, "--no-ce"), *words)


def test_a_corpus_that_is_not_utf8_or_a_split_that_does_not_exist(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\u00e9 au lait, na\u00efve.\n\nMore text.".encode("latin-1"))
    refused(
        cli("capture", "--hook", HOOK, "--corpus", bad, "--out", tmp_path / "s"),
        "not UTF-8",
        "latin1.txt",
    )
    good = tmp_path / "docs.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(30)))
    refused(
        cli(
            "capture",
            "--hook",
            HOOK,
            "--corpus",
            good,
            "--split",
            "validation",
            "--out",
            tmp_path / "s",
        ),
        "no splits of its own",
        "'validation'",
    )
    assert not (tmp_path / "s" / "manifest.json").exists()
