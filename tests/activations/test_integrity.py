"""A store's values are read once: a second open reads only the headers of files that have not
changed, and a file replaced since (or a manifest rewritten) is checked in full again."""

import shutil

import numpy as np
import pytest

import saekit.activations.integrity as integrity
from saekit.activations import ActivationStore, StoreError


def test_a_store_is_hashed_once_and_a_replaced_file_is_caught(store, tmp_path, monkeypatch):
    copy = tmp_path / "s"
    shutil.copytree(store.path, copy)
    hashed = []
    real = integrity.tokens_sha256
    monkeypatch.setattr(integrity, "tokens_sha256", lambda a: hashed.append(1) or real(a))
    ActivationStore(copy)
    assert len(hashed) == 1 and (copy / integrity.CHECKED).exists()
    ActivationStore(copy)
    assert len(hashed) == 1  # unchanged: not read again
    tokens = np.load(copy / "tokens.npy")
    tokens[0, 1] += 1  # another capture's tokens, same shape
    np.save(copy / "tokens.npy", tokens)
    with pytest.raises(StoreError, match="tokens.npy is not the one the manifest"):
        ActivationStore(copy)
    assert len(hashed) == 2
