"""Every file saekit reads, checked field by field before the work: each case damages one field of
a copy and asserts exit code 2, one message naming the file, the field, the value and what was
expected, and that nothing on disk changed."""

import json

import numpy as np
import pytest
import torch
from bad_input import edit_json, refused, run, snapshot
from conftest import HOOK
from safetensors.torch import load_file, save_file

from saekit.data import CorpusError
from saekit.data.corpus import corpus_split


def _eval(sae, store):
    return run("eval", sae, "--store", store, "--no-ce")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c["saekit"].update(k=8.5), ["cfg.json", "'k'", "8.5", "a whole number"]),
        (lambda c: c["saekit"].update(d_sae="1152"), ["cfg.json", "'d_sae'", "'1152'"]),
        (
            lambda c: c["saekit"].update(normalize="spline"),
            ["cfg.json", "normalize 'spline'", "token"],
        ),
        (lambda c: c["saekit"].update(arch="resnet"), ["cfg.json", "'resnet'", "batchtopk"]),
        (
            lambda c: c["saekit"].update(aux_alpha=None),
            ["cfg.json", "'aux_alpha'", "None", "a finite number"],
        ),
        (
            lambda c: c["saekit"].update(theta="calibrated"),
            ["cfg.json: saekit.theta", "'calibrated'", "expected an object"],
        ),
        (
            lambda c: c["saekit"]["theta"].update(source="guess"),
            ["saekit.theta", "source is 'guess'", "'training', 'calibrated'"],
        ),
        (
            lambda c: c["saekit"]["theta"].update(final_estimate="1.7"),
            ["saekit.theta", "final_estimate is '1.7'", "a finite number"],
        ),
    ],
)
def test_a_cfg_json_field_of_the_wrong_kind_is_named(store, my_sae, change, words):
    edit_json(my_sae / "cfg.json", change)
    before = snapshot(my_sae, store.path)
    refused(_eval(my_sae, store.path), *words)
    assert snapshot(my_sae, store.path) == before


def test_a_whole_number_written_as_a_float_is_taken(store, my_sae):
    edit_json(my_sae / "cfg.json", lambda c: c["saekit"].update(d_sae=1152.0, k=8.0))
    r = _eval(my_sae, store.path)
    assert r.returncode == 0, r.stderr
    assert "1,152 latents" in r.stdout and "k = 8;" in r.stdout


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda w: w.update(W_enc=w["W_enc"].to(torch.int8)), ["'W_enc' is int8", "floating"]),
        (lambda w: w["W_enc"].__setitem__((0, 0), float("nan")), ["'W_enc' holds 1 NaN"]),
        (lambda w: w["b_dec"].__setitem__(3, float("inf")), ["'b_dec' holds 1 NaN or infinite"]),
    ],
)
def test_weights_must_be_floating_and_finite(store, my_sae, change, words):
    path = my_sae / "sae_weights.safetensors"
    weights = load_file(path)
    change(weights)
    save_file(weights, path)
    before = snapshot(my_sae)
    refused(_eval(my_sae, store.path), "sae_weights.safetensors", *words)
    assert snapshot(my_sae) == before


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m.update(dtype="float8"), ["field 'dtype' is 'float8'", "float32"]),
        (lambda m: m.update(hooks=[]), ["field 'hooks' is []", "non-empty list"]),
        (lambda m: m.update(d_model="576"), ["field 'd_model' is '576'", "whole number"]),
        (lambda m: m.update(d_model=575.5), ["field 'd_model' is 575.5"]),
        (lambda m: m.update(n_rows=-3), ["field 'n_rows' is -3", "0 or more"]),
    ],
)
def test_a_manifest_field_of_the_wrong_kind_is_named(my_store, sae_dir, change, words):
    edit_json(my_store / "manifest.json", change)
    before = snapshot(my_store)
    refused(_eval(sae_dir, my_store), "manifest.json is corrupt", *words)
    assert snapshot(my_store) == before


def _damage_npy(path, change):
    arr = np.load(path)
    change(arr)
    np.save(path, arr)


@pytest.mark.parametrize(
    "file, change, words",
    [
        ("shards/00000.pos.npy", lambda p: p.__setitem__((0, 1), 64), ["position 64", "[0, 63]"]),
        ("shards/00000.pos.npy", lambda p: p.__setitem__((0, 1), -1), ["position -1"]),
        ("shards/00001.pos.npy", lambda p: p.__setitem__((0, 0), 0), ["sequence 0", "[10, 19]"]),
        ("doc_ids.npy", lambda d: d.__setitem__((0, 1), -5), ["doc_ids.npy holds -5", "below -1"]),
        ("tokens.npy", lambda t: t.__setitem__((0, 1), -2), ["tokens.npy holds -2", "below 0"]),
    ],
)
def test_token_position_and_document_files_are_checked_in_range(
    my_store, sae_dir, file, change, words
):
    _damage_npy(my_store / file, change)
    before = snapshot(my_store)
    refused(_eval(sae_dir, my_store), *words)
    assert snapshot(my_store) == before


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_a_corpus_record_whose_text_is_not_a_string_is_named_by_line(tmp_path):
    docs = [f"document number {i}, with a few words" for i in range(30)]
    for bad, shown in ((12345, "12345 (a JSON int)"), ({"a": 1}, "{'a': 1} (a JSON dict)")):
        corpus = _jsonl(tmp_path / "docs.jsonl", docs[:7] + [bad] + docs[7:])
        refused(
            run("capture", "--hook", HOOK, "--corpus", corpus, "--out", tmp_path / "s"),
            "docs.jsonl, line 8",
            f"'text' is {shown}",
            "expected a string",
        )
    assert not (tmp_path / "s").exists()


def test_null_texts_are_skipped_and_counted(tmp_path):
    docs = [f"document number {i}, with a few words" for i in range(30)]
    corpus = _jsonl(tmp_path / "docs.jsonl", docs[:5] + [None, None] + docs[5:])
    with pytest.warns(UserWarning, match="2 record"):
        ds, rule = corpus_split(str(corpus), split="all")
    assert rule["null_texts_skipped"] == 2 and len(ds) == 32
    with pytest.raises(CorpusError, match="line 1: 'text' is 7"):
        corpus_split(str(_jsonl(tmp_path / "nums.jsonl", [7, 8])), split="all")
