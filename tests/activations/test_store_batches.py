import numpy as np
import pytest
import torch
from conftest import HOOK

from saekit.activations import ActivationStore, capture
from saekit.data import pack


def test_shuffled_batches_cover_every_row_once_per_epoch(store):
    pos_all = store.positions()
    keys_all = sorted(map(tuple, pos_all.tolist()))
    seen = []
    for x, p in store.batches(
        96, shuffle=True, seed=3, buffer_rows=700, chunk_rows=128, epochs=2, return_positions=True
    ):
        assert x.dtype == torch.float32 and x.shape[1] == 576
        seen.extend(map(tuple, p.tolist()))
    n = len(pos_all)
    assert sorted(seen[:n]) == keys_all and sorted(seen[n:]) == keys_all
    assert seen[:200] != list(map(tuple, pos_all[:200].tolist())), "not shuffled"
    # rows delivered with their positions are the stored rows
    x, p = next(store.batches(50, shuffle=True, seed=1, return_positions=True))
    full = store.load()
    index = {tuple(k): i for i, k in enumerate(pos_all.tolist())}
    assert torch.equal(x, full[[index[tuple(k)] for k in p.tolist()]])
    # ranks split the epoch without overlap
    r0 = [
        tuple(k)
        for _, pp in store.batches(64, rank=0, world_size=2, chunk_rows=100, return_positions=True)
        for k in pp.tolist()
    ]
    r1 = [
        tuple(k)
        for _, pp in store.batches(64, rank=1, world_size=2, chunk_rows=100, return_positions=True)
        for k in pp.tolist()
    ]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == keys_all


def test_batches_mix_rows_from_across_the_store(store):
    """Shuffle quality with bounded RAM: each batch draws on many places spread over the whole
    store, not on one stretch of consecutive rows."""
    n = len(store)
    rank = {tuple(k): i for i, k in enumerate(store.positions().tolist())}
    batches = list(
        store.batches(
            64, seed=0, buffer_rows=1024, chunk_rows=64, drop_last=True, return_positions=True
        )
    )
    for _, p in batches[:10]:
        rows = np.array([rank[tuple(k)] for k in p.tolist()])
        # rows of at least 12 different 64-row chunks in 64 rows
        assert len(np.unique(rows // 64)) >= 12
        assert rows.max() - rows.min() > n / 2  # from both halves of the store
    centres = [np.mean([rank[tuple(k)] for k in p.tolist()]) for _, p in batches]
    # every batch centred on the store, none on one stretch
    assert all(n / 4 < c < 3 * n / 4 for c in centres)


def test_batches_kept_across_buffer_refills_keep_their_rows(store):
    """The shuffle buffer is refilled in place: every batch must be a copy, so batches kept while
    later buffers are read still hold the stored rows of their positions (a view of the buffer
    would show later rows)."""
    full = store.load()
    index = {tuple(k): i for i, k in enumerate(store.positions().tolist())}
    # batches in the stored dtype: no conversion copy to hide a view
    stored = getattr(torch, store.dtype)
    kept = list(
        store.batches(
            80,
            seed=2,
            buffer_rows=500,
            chunk_rows=100,
            epochs=2,
            return_positions=True,
            dtype=stored,
        )
    )
    assert len(kept) > 2 * len(store) // 500  # several refills in each of the two epochs
    seen = [tuple(k) for _, p in kept for k in p.tolist()]  # read only now, after every refill
    n = len(store)
    # each row once an epoch
    assert sorted(seen[:n]) == sorted(index) and sorted(seen[n:]) == sorted(index)
    for x, p in kept:
        assert x.dtype == stored and torch.equal(
            x.float(), full[[index[tuple(k)] for k in p.tolist()]].float()
        )


def test_a_pass_over_the_store_refills_the_last_passes_buffer_and_never_shares_one(store):
    """Each pass over a store (a trainer's init sample, training, calibration) refills the buffer
    the previous pass left, its pages already in place, and gives the batches a first pass gives;
    two passes at once each have a buffer of their own."""
    kw = dict(buffer_rows=512, chunk_rows=64)
    alone = list(store.batches(64, seed=5, **kw))
    left = store._spare
    assert left is not None
    again = list(store.batches(64, seed=5, **kw))
    # the same arrays, refilled in place
    assert store._spare is left and len(again) == len(alone) > 8
    assert all(torch.equal(a, b) for a, b in zip(alone, again))
    other = list(store.batches(64, seed=6, **kw))
    got_a, got_b = [], []
    # both at once
    for xa, xb in zip(store.batches(64, seed=5, **kw), store.batches(64, seed=6, **kw)):
        got_a.append(xa)
        got_b.append(xb)
    assert len(got_a) == len(alone) and all(torch.equal(a, b) for a, b in zip(alone, got_a))
    assert all(torch.equal(a, b) for a, b in zip(other, got_b)) and not torch.equal(
        got_a[0], got_b[0]
    )


def test_the_next_buffer_is_read_ahead_by_the_kernel(store, monkeypatch):
    """Once a buffer is read, the kernel is asked (posix_fadvise WILLNEED) for exactly the next
    buffer's chunks, in the activation and the position files, before that buffer is read; the
    batches are unchanged."""
    import os

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("this OS has no posix_fadvise: the read-ahead is a no-op here")
    calls, reads = [], []
    real_advise, real_read = os.posix_fadvise, ActivationStore._read_chunks

    def advise(fd, offset, length, how):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, how, len(reads)))
        return real_advise(fd, offset, length, how)

    def read(self, group, *args):
        reads.append([(c.shard, c.start, c.end) for c in group])
        return real_read(self, group, *args)

    plain = [x for x in store.batches(96, seed=5, buffer_rows=700, chunk_rows=128)]
    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(ActivationStore, "_read_chunks", read)
    advised = [x for x in store.batches(96, seed=5, buffer_rows=700, chunk_rows=128)]
    assert len(plain) == len(advised) and all(torch.equal(a, b) for a, b in zip(plain, advised))
    assert len(reads) >= 3 and {c[3] for c in calls} == {os.POSIX_FADV_WILLNEED}
    arrays = {
        what: {sh["index"]: store._open(sh, what) for sh in store.shards} for what in (HOOK, "pos")
    }
    for i, group in enumerate(reads[1:], start=1):
        # the advice given once i buffers were read (the one before this group, not yet this one)
        got = {(f, o, n) for f, o, n, _, t in calls if t == i}
        want = {
            (
                os.path.realpath(arr[s].filename),
                arr[s].offset + a * arr[s].strides[0],
                (b - a) * arr[s].strides[0],
            )
            for arr in arrays.values()
            for s, a, b in group
        }
        assert got == want, i
    assert len(calls) == 2 * sum(len(g) for g in reads[1:])  # nothing else advised


def test_bfloat16_store_batches_carry_exact_rows(model, tokenizer, tmp_path):
    """The bf16 path of the shuffle buffer (stored as 16-bit words, carried over between buffers)
    loses no bit."""
    p = pack(["It was the best of times, it was the worst of times. " * 30], tokenizer, seq_len=32)
    st = ActivationStore(
        capture(model, p, HOOK, tmp_path / "bf", dtype="bfloat16", progress=False).path
    )
    full, index = st.rows(0, len(st)), {tuple(k): i for i, k in enumerate(st.positions().tolist())}
    for x, pos in st.batches(
        24, seed=2, buffer_rows=100, chunk_rows=20, dtype=torch.bfloat16, return_positions=True
    ):
        assert torch.equal(x, full[[index[tuple(k)] for k in pos.tolist()]])
