"""A store's values are read once: the capture that finishes it records its files, later opens read
only the headers of files that have not changed, and a file replaced since (or a manifest rewritten)
is checked in full again. Opening never writes."""

import shutil

import numpy as np
import pytest

import saekit.activations.integrity as integrity
from saekit.activations import ActivationStore, StoreError


def _files(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_a_finished_store_is_not_hashed_again_and_a_replaced_file_is_caught(
    store, tmp_path, monkeypatch
):
    copy = tmp_path / "s"
    shutil.copytree(store.path, copy)  # times kept: the capture's record still holds
    assert (copy / integrity.CHECKED).exists()
    hashed = []
    real = integrity.tokens_sha256
    monkeypatch.setattr(integrity, "tokens_sha256", lambda a: hashed.append(1) or real(a))
    before = _files(copy)
    ActivationStore(copy)
    assert hashed == [] and _files(copy) == before  # headers only, and nothing written
    tokens = np.load(copy / "tokens.npy")
    tokens[0, 1] += 1  # another capture's tokens, same shape
    np.save(copy / "tokens.npy", tokens)
    with pytest.raises(StoreError, match="tokens.npy is not the one the manifest"):
        ActivationStore(copy)
    assert len(hashed) == 1
    (copy / integrity.CHECKED).unlink()  # a store without the record: checked in full each open
    np.save(copy / "tokens.npy", np.load(store.path / "tokens.npy"))
    ActivationStore(copy)
    ActivationStore(copy)
    assert len(hashed) == 3 and not (copy / integrity.CHECKED).exists()
