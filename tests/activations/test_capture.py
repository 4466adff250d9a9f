import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import HOOK

from saekit.activations import ActivationStore, StoreError, capture
from saekit.data import pack


def _hf_hidden(model, packed, seqs, layer):
    ids = torch.from_numpy(packed.tokens[seqs].astype(np.int64))
    with torch.no_grad():
        return model._module(ids, output_hidden_states=True).hidden_states[layer + 1]


def test_capture_equals_plain_transformers_forward(model, packed, store):
    """fp32 store == output_hidden_states[layer+1] at every kept position (abs tol 1e-5)."""
    pos = store.positions()
    x = store.load(HOOK)
    assert x.shape == (len(store), 576) and len(store) >= 2000
    seqs = sorted(set(pos[:300, 0].tolist()))[:4]
    hs = _hf_hidden(model, packed, seqs, layer=6)
    for i, s in enumerate(seqs):
        rows = np.nonzero(pos[:, 0] == s)[0]
        ref = hs[i, pos[rows, 1]]
        assert torch.allclose(x[rows], ref, atol=1e-5, rtol=0), float((x[rows] - ref).abs().max())
    # positions trace back to tokens: kept positions are exactly the non-BOS, non-padding ones
    assert (store.tokens[pos[:, 0], pos[:, 1]] != packed.bos_token_id).all()
    assert store.manifest["n_rows"] == int(packed.keep[: store.manifest["n_sequences"]].sum())


def test_second_hook_from_same_pass_matches_mlp_output(model, packed, store):
    pos = store.positions()
    x = store.load("mlp_out.3")
    s = int(pos[0, 0])
    got = {}
    h = model._module.model.layers[3].mlp.register_forward_hook(
        lambda m, i, o: got.setdefault("o", o)
    )
    try:
        with torch.no_grad():
            model._module(torch.from_numpy(packed.tokens[[s]].astype(np.int64)))
    finally:
        h.remove()
    rows = np.nonzero(pos[:, 0] == s)[0]
    assert torch.allclose(x[rows], got["o"][0, pos[rows, 1]], atol=1e-5)


def test_fp16_and_bf16_stores_round_trip(model, tokenizer, tmp_path):
    p = pack(["It was the best of times, it was the worst of times. " * 20], tokenizer, seq_len=32)
    ref = capture(model, p, HOOK, tmp_path / "f32", dtype="float32", progress=False).load()
    for dt, tol in (("float16", 2e-3), ("bfloat16", 1e-2)):
        st = ActivationStore(capture(model, p, HOOK, tmp_path / dt, dtype=dt, progress=False).path)
        assert st.dtype == dt
        got = st.load()
        rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
        assert rel < tol, (dt, float(rel))


CAPTURE_SCRIPT = textwrap.dedent("""
    import sys
    from saekit.models import load_model
    from saekit.data import packed_corpus
    from saekit.activations import capture
    m = load_model()
    p = packed_corpus(m.tokenizer, seq_len=32, max_tokens=3000)
    capture(m, p, "resid_post.2", sys.argv[1], n_tokens=2500, batch_size=2, shard_tokens=128,
            dtype="float32", progress=False)
""")


def test_interrupted_capture_resumes_without_loss_or_duplicates(tmp_path, model, tokenizer):
    script = tmp_path / "cap.py"
    script.write_text(CAPTURE_SCRIPT)
    out = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    killed_with = None
    while time.time() < deadline and proc.poll() is None:
        m = out / "manifest.json"
        if m.exists():
            shards = json.loads(m.read_text())["shards"]
            if len(shards) >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_with = len(shards)
                break
        time.sleep(0.05)
    proc.wait()
    assert killed_with is not None, (
        f"capture finished or failed before it could be killed: {proc.stderr.read()[-2000:]}"
    )
    part = json.loads((out / "manifest.json").read_text())
    assert not part["complete"]
    # resume in-process with the same arguments
    from saekit.data import packed_corpus

    p = packed_corpus(tokenizer, seq_len=32, max_tokens=3000)
    st = capture(
        model,
        p,
        "resid_post.2",
        out,
        n_tokens=2500,
        batch_size=2,
        shard_tokens=128,
        dtype="float32",
        progress=False,
    )
    assert st.manifest["complete"]
    ref = capture(
        model,
        p,
        "resid_post.2",
        tmp_path / "ref",
        n_tokens=2500,
        batch_size=2,
        shard_tokens=128,
        dtype="float32",
        progress=False,
    )
    assert np.array_equal(st.positions(), ref.positions())
    assert len(set(map(tuple, st.positions().tolist()))) == len(st)
    assert torch.allclose(st.load(), ref.load(), atol=1e-5)
    assert not list((out / "shards").glob(".*.tmp")), "temp files left behind"


def test_resume_refuses_a_different_capture(model, packed, store):
    # the same capture with another shard size is the same store: reused as it is
    again = capture(
        model,
        packed,
        [HOOK, "mlp_out.3"],
        store.path,
        n_tokens=2000,
        batch_size=8,
        dtype="float32",
        shard_tokens=10**6,
        progress=False,
    )
    assert again.manifest == store.manifest
    with pytest.raises(StoreError, match="different capture"):
        capture(model, packed, "resid_post.7", store.path, n_tokens=2000, progress=False)


def _copy_store(store, dst):
    import shutil

    shutil.copytree(store.path, dst)
    return dst


def test_damaged_stores_give_clear_errors(store, tmp_path):
    d = _copy_store(store, tmp_path / "missing")
    next((d / "shards").glob("00001.resid_post*.npy")).unlink()
    with pytest.raises(StoreError, match="missing"):
        ActivationStore(d)
    d = _copy_store(store, tmp_path / "trunc")
    f = next((d / "shards").glob("00000.resid_post*.npy"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(StoreError, match="truncated"):
        ActivationStore(d)
    d = _copy_store(store, tmp_path / "disagree")
    m = json.loads((d / "manifest.json").read_text())
    m["shards"][0]["n_rows"] += 5
    m["n_rows"] += 5
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest says"):
        ActivationStore(d)
    d = _copy_store(store, tmp_path / "corrupt")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore(d)
    with pytest.raises(StoreError, match="no manifest"):
        ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="not in store"):
        ActivationStore(store.path, hook="resid_post.9")


def test_bad_capture_arguments(model, packed, tmp_path):
    with pytest.raises(StoreError, match="dtype"):
        capture(model, packed, HOOK, tmp_path / "a", dtype="int8", progress=False)
    with pytest.raises(StoreError, match="positive"):
        capture(model, packed, HOOK, tmp_path / "b", n_tokens=0, progress=False)


def test_nan_activations_are_refused(model, tokenizer, tmp_path):
    p = pack(["Some words to run through the model."] * 3, tokenizer, seq_len=16)
    layer = model._module.model.layers[0]  # NaN flows into layer 1
    h = layer.register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        with pytest.raises(StoreError, match="NaN"):
            capture(model, p, "resid_post.1", tmp_path / "nan", progress=False)
    finally:
        h.remove()
    assert (
        not list((tmp_path / "nan" / "shards").glob("*.npy"))
        if (tmp_path / "nan" / "shards").exists()
        else True
    )


def test_capture_records_how_documents_were_sampled(model, tmp_path):
    from saekit.activations import ActivationStore, capture
    from saekit.data import packed_corpus

    p = packed_corpus(model.tokenizer, seq_len=32, max_tokens=300, seed=5)
    capture(model, p, HOOK, tmp_path / "s", n_tokens=300, batch_size=8, progress=False)
    m = ActivationStore(tmp_path / "s").manifest
    assert (
        m["corpus"]["sampling"] == {"method": "shuffled documents", "seed": 5}
        and m["corpus"]["split"] == "train"
    )


def test_capture_splits_adds_a_calibration_store_of_unseen_training_documents(model, tmp_path):
    from saekit.activations import capture_splits

    train, test, calib = capture_splits(
        model,
        HOOK,
        tmp_path,
        600,
        300,
        seq_len=32,
        batch_size=8,
        progress=False,
        # documents are ~700 tokens: the calibration part spans several
        calib_tokens=1500,
    )
    assert len(train) >= 600 and len(test) >= 300 and len(calib) >= 1500
    n_train = train.manifest["n_sequences"]
    assert calib.manifest["corpus"]["part"] == {
        "sequences": [n_train, n_train + calib.manifest["n_sequences"]]
    }
    assert (
        calib.manifest["corpus"]["split"] == "train" and test.manifest["corpus"]["split"] == "test"
    )
    docs = lambda s: set(np.unique(s.doc_ids[s.doc_ids >= 0]).tolist())
    # at most the one it continues
    assert len(docs(calib) - docs(train)) >= 1 and len(docs(calib) & docs(train)) <= 1
    again = capture_splits(
        model, HOOK, tmp_path, 600, 300, seq_len=32, batch_size=8, progress=False
    )
    assert [s.manifest["tokens_sha256"] for s in again] == [
        train.manifest["tokens_sha256"],
        test.manifest["tokens_sha256"],
    ]
