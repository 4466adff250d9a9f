import json

import pytest

from saekit.data import CorpusError, iter_texts, load_corpus, pack, packed_corpus


def test_bundled_corpus_is_varied_and_split(tokenizer):
    full = load_corpus(split="all")
    train, test = load_corpus(split="train"), load_corpus(split="test")
    assert len(train) + len(test) == len(full) and len(test) == (len(full) + 19) // 20
    authors = set(full["author"])
    assert len(authors) >= 4, authors
    assert set(full["genre"]) >= {"drama", "verse", "essay", "encyclopedia", "scripture"}


def test_packing_rows_start_with_bos_and_positions_map_back_to_text(tokenizer):
    docs = [
        "Alpha beta gamma delta. " * 7,
        "The quick brown fox jumps over the lazy dog. " * 5,
        "Short one.",
    ]
    p = pack(docs, tokenizer, seq_len=16)
    assert p.tokens.shape[1] == 16
    assert (p.tokens[:, 0] == tokenizer.bos_token_id).all()
    assert not p.keep[:, 0].any() and not p.keep[p.tokens == tokenizer.bos_token_id].any()
    # every kept position belongs to a document and the kept tokens of each
    # document re-form its text
    for d, text in enumerate(docs):
        ids = p.tokens[(p.doc_ids == d) & p.keep]
        assert tokenizer.decode(ids.tolist()) == text
    # tokens are never duplicated or lost: all document tokens in order
    expected = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in docs)
    assert p.n_kept == expected
    # the last row is padded, padding is not kept
    assert p.tokens[-1, -1] == p.pad_token_id and p.doc_ids[-1, -1] == -1 and not p.keep[-1, -1]


def test_max_tokens_stops_early(tokenizer):
    p = packed_corpus(tokenizer, seq_len=32, max_tokens=500)
    assert 500 <= p.n_kept < 500 + 2 * 32 * 64  # stops within one tokenizer batch of documents
    assert p.meta["corpus"] == "bundled"
    n = p.sequences_for(300)
    assert p.head(n).n_kept >= 300 and p.head(n - 1).n_kept < 300


def test_local_files_load_the_same_way(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": f"Document number {i}."}) for i in range(5))
    )
    ds = load_corpus(str(tmp_path / "a.jsonl"), text_field="body")
    assert list(iter_texts(ds, "body"))[2] == "Document number 2."
    (tmp_path / "b.txt").write_text("First paragraph here.\n\nSecond paragraph there.\n")
    texts = list(iter_texts(load_corpus(str(tmp_path / "b.txt"))))
    assert len(texts) == 2 and texts[1].startswith("Second")


def test_bad_corpora_give_clear_errors(tmp_path, tokenizer):
    with pytest.raises(CorpusError, match="no 'text' column"):
        (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
        load_corpus(str(tmp_path / "c.jsonl"))
    with pytest.raises(CorpusError, match="bundled"):
        load_corpus("no-such-user/no-such-dataset-xyz")
    with pytest.raises(CorpusError, match="no tokens"):
        pack(["", "   "], tokenizer)
    with pytest.raises(CorpusError, match="splits"):
        load_corpus(split="validation")
    with pytest.raises(CorpusError, match="seq_len"):
        pack(["hello"], tokenizer, seq_len=1)


def test_documents_are_drawn_from_across_the_split_with_a_seed(tokenizer):
    ds = load_corpus(split="train")
    n_docs = len(ds)
    shuffled = packed_corpus(tokenizer, seq_len=64, max_tokens=3000)
    ordered = packed_corpus(tokenizer, seq_len=64, max_tokens=3000, shuffle=False)
    docs = lambda p: sorted({int(d) for d in p.doc_ids[p.doc_ids >= 0]})
    # in corpus order the first documents are one play; a seeded shuffle reaches
    # every part of the split
    assert max(docs(ordered)) < n_docs // 10
    picked = docs(shuffled)
    assert min(picked) < n_docs // 3 and max(picked) > 2 * n_docs // 3
    assert (
        len({ds[d]["genre"] for d in picked}) >= 2
        and len({ds[d]["genre"] for d in docs(ordered)}) == 1
    )
    # doc ids point back into the split: each document's kept tokens re-form the start of its text
    d = picked[0]
    ids = shuffled.tokens[(shuffled.doc_ids == d) & shuffled.keep]
    assert ds[d]["text"].startswith(tokenizer.decode(ids.tolist())[:40])
    assert shuffled.meta["sampling"] == {"method": "shuffled documents", "seed": 0}
    assert ordered.meta["sampling"] == {"method": "document order"}
    again = packed_corpus(tokenizer, seq_len=64, max_tokens=3000)
    other = packed_corpus(tokenizer, seq_len=64, max_tokens=3000, seed=1)
    assert again.sha256() == shuffled.sha256() and other.sha256() != shuffled.sha256()


def test_streamed_data_sets_pass_through_a_shuffle_buffer():
    import datasets

    from saekit.data import sample_documents

    stream = datasets.Dataset.from_dict(
        {"text": [f"document {i}" for i in range(200)]}
    ).to_iterable_dataset()
    docs, how = sample_documents(stream, buffer_size=100, seed=3)
    texts = [t for _, t in docs]
    assert how == {"method": "shuffle buffer", "seed": 3, "buffer_size": 100}
    assert sorted(texts) == sorted(f"document {i}" for i in range(200)) and texts[:20] != [
        f"document {i}" for i in range(20)
    ]
