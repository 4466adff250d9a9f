"""The bad-input suite: each case runs the CLI as a user would and asserts exit code 2, no
traceback, a message that names the problem, and that nothing already written (store, SAE folder,
checkpoints) changed."""

import json

import numpy as np
import pytest
from bad_input import cli, edit_json, holding_lock, refused, release, snapshot
from conftest import HOOK


def test_a_second_writer_is_refused_and_names_the_first(store, my_store):
    before = snapshot(my_store)
    first = holding_lock(my_store)  # as a capture running there holds it
    try:
        msg = refused(
            cli(
                "capture",
                "--hook",
                HOOK,
                "--tokens",
                500,
                "--out",
                my_store,
                "--overwrite",
                "--sample-seed",
                1,
            ),
            "being written by",
            f"process {first.pid}",
        )
        assert "another folder" in msg
        refused(
            cli("export-store", store.path, my_store, "--overwrite"),
            "being written by",
            f"process {first.pid}",
        )
    finally:
        release(first)
    assert snapshot(my_store) == before


def test_export_and_train_hold_their_folders(store, tmp_path):
    np.save(
        tmp_path / "acts.npy",
        np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32),
    )
    out = tmp_path / "run"
    first = holding_lock(out)
    try:
        refused(
            cli(
                "train",
                "--store",
                tmp_path / "acts.npy",
                "--out",
                out,
                "--k",
                4,
                "--tokens",
                512,
                "--batch-size",
                128,
            ),
            "being written by",
            f"process {first.pid}",
        )
    finally:
        release(first)
    exported = tmp_path / "exported"
    first = holding_lock(exported, beside=True)
    try:
        refused(
            cli("export-store", store.path, exported), "being written by", f"process {first.pid}"
        )
    finally:
        release(first)
    assert not exported.exists()


def test_a_store_mixed_from_two_captures_never_loads(my_store, sae_dir):
    tokens = np.load(my_store / "tokens.npy")
    # another capture's tokens, same shape
    np.save(my_store / "tokens.npy", (tokens + 1).astype(tokens.dtype))
    refused(cli("eval", sae_dir, "--store", my_store, "--no-ce"), "tokens.npy is not the one")
    np.save(my_store / "tokens.npy", tokens)
    edit_json(my_store / "manifest.json", lambda m: m["shards"][1].update(tokens_sha256="0" * 64))
    refused(
        cli("eval", sae_dir, "--store", my_store, "--no-ce"),
        "shard 1 was captured from other tokens",
    )


def test_eval_refuses_another_hook_and_allows_it_on_purpose(store, my_sae, tmp_path):
    before = snapshot(my_sae)
    refused(
        cli("eval", my_sae, "--store", store.path, "--hook", "mlp_out.3", "--no-ce"),
        HOOK,
        "mlp_out.3",
        "--allow-mismatch",
    )
    refused(
        cli("eval", my_sae, "--store", store.path, "--hook", "resid_post.99", "--no-ce"),
        "resid_post.99",
        "no activations",
    )
    refused(
        cli("calibrate", my_sae, "--store", store.path, "--hook", "mlp_out.3"), HOOK, "mlp_out.3"
    )
    assert snapshot(my_sae) == before
    r = cli(
        "eval",
        my_sae,
        "--store",
        store.path,
        "--hook",
        "mlp_out.3",
        "--no-ce",
        "--allow-mismatch",
        "--json",
        "--tokens",
        500,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sae"]["hook_name"] == "mlp_out.3"
    edit_json(my_sae / "cfg.json", lambda c: c["saekit"].update(hook_name="resid_post.9"))
    refused(
        cli("eval", my_sae, "--store", store.path, "--no-ce"), "the SAE's hook 'resid_post.9'", HOOK
    )


def test_a_store_of_another_model_is_refused(my_store, my_sae):
    edit_json(my_store / "manifest.json", lambda m: m.update(model="gpt2"))
    before = snapshot(my_sae, my_store)
    refused(cli("eval", my_sae, "--store", my_store, "--no-ce"), "gpt2", "SmolLM2")
    refused(cli("calibrate", my_sae, "--store", my_store), "gpt2", "SmolLM2")
    assert snapshot(my_sae, my_store) == before


def test_nan_rows_are_refused_by_eval_and_calibrate_naming_shard_and_row(my_store, my_sae):
    shard = my_store / "shards" / f"00001.{HOOK}.npy"
    acts = np.load(shard, mmap_mode="r+")
    acts[5, 3] = np.nan
    acts.flush()
    del acts
    before = snapshot(my_sae, my_store)
    refused(cli("eval", my_sae, "--store", my_store, "--no-ce"), "NaN/inf", "shard 00001, row 5")
    refused(cli("calibrate", my_sae, "--store", my_store), "NaN/inf", "shard 00001, row 5")
    assert snapshot(my_sae, my_store) == before


def test_resume_with_another_seed_store_or_budget_is_refused(store, my_store, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--store",
        store.path,
        "--hook",
        HOOK,
        "--k",
        8,
        "--expansion",
        2,
        "--tokens",
        1024,
        "--batch-size",
        256,
        "--warmup-steps",
        1,
        "--checkpoint-every",
        2,
        "--out",
        out,
    ]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    saved = snapshot(out)
    refused(cli(*args, "--seed", 1), "--seed: 0 then, 1 now")
    refused(cli(*args, "--tokens", 2048), "--tokens: 1024 then, 2048 now")
    edit_json(my_store / "manifest.json", lambda m: m["corpus"].update(note="another capture"))
    other = [a if a != store.path else my_store for a in args]
    refused(cli(*other), "the training data", str(store.path), str(my_store))
    assert snapshot(out) == saved


@pytest.mark.parametrize(
    "args, flag",
    [
        (["train", "--store", "x", "--out", "y", "--batch-size", 0], "--batch-size"),
        (["train", "--store", "x", "--out", "y", "--lr", -1], "--lr"),
        (["train", "--store", "x", "--out", "y", "--checkpoint-every", -1], "--checkpoint-every"),
        (["eval", "x", "--store", "y", "--tokens", 0], "--tokens"),
        (["eval", "x", "--store", "y", "--tokens", -10], "--tokens"),
        (["calibrate", "x", "--store", "y", "--tokens", 0], "--tokens"),
        (["capture", "--hook", HOOK, "--out", "y", "--tokens", 0], "--tokens"),
    ],
)
def test_bad_numbers_are_refused_by_name(args, flag):
    r = cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"argument {flag}" in r.stderr and "must be" in r.stderr, r.stderr
