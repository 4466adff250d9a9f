"""Text tokenised with BOS and packed into fixed-length sequences, each position keeping its
token and its document."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .corpus import BUNDLED, CorpusError, corpus_split, sample_documents


def tokens_sha256(tokens: np.ndarray) -> str:
    """The identity of packed token ids (a store's manifest and every shard's completion record
    carry it)."""
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


@dataclass
class PackedTokens:
    """Fixed-length token sequences and where each token came from.

    tokens [n_seq, seq_len] int32 (position 0 is BOS); doc_ids [n_seq, seq_len] int32 (-1 on
    BOS/padding); keep [n_seq, seq_len] bool: positions whose activations are kept (BOS and padding
    dropped).
    """

    tokens: np.ndarray
    doc_ids: np.ndarray
    keep: np.ndarray
    bos_token_id: int
    pad_token_id: int
    meta: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    def sha256(self) -> str:
        return tokens_sha256(self.tokens)

    def head(self, n_sequences: int) -> PackedTokens:
        return self.sequences(0, n_sequences)

    def sequences(self, start: int, end: int) -> PackedTokens:
        """Sequences [start, end) as packed tokens of their own (meta records which part of the
        packing)."""
        meta = (
            {**self.meta, "part": {"sequences": [int(start), int(min(end, self.n_sequences))]}}
            if start
            else dict(self.meta)
        )
        return PackedTokens(
            self.tokens[start:end],
            self.doc_ids[start:end],
            self.keep[start:end],
            self.bos_token_id,
            self.pad_token_id,
            meta,
        )

    def sequences_for(self, n_tokens: int) -> int:
        """How many leading sequences hold at least n_tokens kept positions (all of them if
        fewer)."""
        cum = np.cumsum(self.keep.sum(1))
        idx = int(np.searchsorted(cum, n_tokens))
        return min(idx + 1, self.n_sequences)


def pack(
    texts: Iterable[str] | Iterable[tuple[int, str]],
    tokenizer,
    seq_len: int = 128,
    max_tokens: int | None = None,
    drop_bos: bool = True,
    batch_docs: int = 64,
) -> PackedTokens:
    """Tokenise documents and pack them into rows of `seq_len`: each row starts with BOS and
    documents are separated by BOS. Stops once `max_tokens` kept positions exist (None: all text).
    `texts` yields strings (documents numbered in order) or (document index, string) pairs.
    """
    packer = Packer(tokenizer, seq_len, drop_bos)
    batch: list[tuple[int, str]] = []
    for item in texts:
        d, text = item if isinstance(item, tuple) else (packer.n_documents + len(batch), item)
        if not text or not text.strip():
            continue
        batch.append((int(d), text))
        if len(batch) >= batch_docs:
            packer.add(batch)
            batch = []
            packer.flush(final=False, max_tokens=max_tokens)
            if max_tokens is not None and packer.kept >= max_tokens:
                break
    else:
        if batch:
            packer.add(batch)
        packer.flush(final=True, max_tokens=max_tokens)
    return packer.packed()


class Packer:
    """Documents packed into rows of seq_len as they come: each row starts with BOS, documents are
    separated by BOS, and a row is made once its body is full (or at the end)."""

    def __init__(self, tokenizer, seq_len: int, drop_bos: bool = True):
        if seq_len < 2:
            raise CorpusError(f"seq_len must be at least 2 (BOS plus one token), got {seq_len}")
        bos = tokenizer.bos_token_id
        bos = bos if bos is not None else tokenizer.eos_token_id
        if bos is None:
            raise CorpusError(
                "the tokenizer has neither a BOS nor an EOS token to start sequences with"
            )
        pad = tokenizer.pad_token_id
        self.tokenizer, self.seq_len, self.drop_bos = tokenizer, seq_len, drop_bos
        self.bos, self.pad = int(bos), int(pad if pad is not None else bos)
        self.stream_tok: list[int] = []  # tokens not yet in a row, and their documents
        self.stream_doc: list[int] = []
        self.rows_tok: list[np.ndarray] = []
        self.rows_doc: list[np.ndarray] = []
        self.rows_len: list[int] = []  # non-padding length of each row
        self.kept = 0
        self.n_documents = 0

    def add(self, docs: list[tuple[int, str]]) -> None:
        """Tokenise (document index, text) pairs and append them to the stream."""
        texts = [t for _, t in docs]
        for ids, (d, _) in zip(self.tokenizer(texts, add_special_tokens=False)["input_ids"], docs):
            # separate documents by BOS (a row start already has one)
            if self.stream_tok or self.rows_tok:
                self.stream_tok.append(self.bos)
                self.stream_doc.append(-1)
            self.stream_tok.extend(ids)
            self.stream_doc.extend([d] * len(ids))
            self.n_documents += 1

    def flush(self, final: bool, max_tokens: int | None = None) -> None:
        """Make every full row of the stream (and with `final`, the rest as a padded row), stopping
        once max_tokens kept positions exist."""
        body, bos, pad = self.seq_len - 1, self.bos, self.pad
        while len(self.stream_tok) >= body or (final and self.stream_tok):
            t, d = self.stream_tok[:body], self.stream_doc[:body]
            self.stream_tok, self.stream_doc = self.stream_tok[body:], self.stream_doc[body:]
            n_pad = body - len(t)
            self.rows_tok.append(np.array([bos] + t + [pad] * n_pad, dtype=np.int32))
            self.rows_doc.append(np.array([-1] + d + [-1] * n_pad, dtype=np.int32))
            self.rows_len.append(1 + len(t))
            self.kept += sum(1 for x in t if x != bos) if self.drop_bos else len(t)
            if max_tokens is not None and self.kept >= max_tokens:
                return

    def take(self) -> PackedTokens:
        """The rows made so far as PackedTokens, handed over: the next rows start afresh, from the
        tokens still in the stream."""
        packed = self.packed()
        self.rows_tok, self.rows_doc, self.rows_len, self.kept = [], [], [], 0
        return packed

    def carry(self) -> dict:
        """The tokens not yet in a row and their documents: with the documents read so far, what
        rebuilds this packer (`restore`)."""
        return {"tokens": list(self.stream_tok), "docs": list(self.stream_doc)}

    def restore(self, carry: dict) -> None:
        self.stream_tok, self.stream_doc = list(carry["tokens"]), list(carry["docs"])

    def packed(self) -> PackedTokens:
        """The rows made so far as PackedTokens."""
        if not self.rows_tok or self.kept == 0:
            raise CorpusError(
                "the corpus produced no tokens: it is empty or all its texts are blank"
            )
        tokens, doc_ids = np.stack(self.rows_tok), np.stack(self.rows_doc)
        keep = doc_ids >= 0  # drops every BOS (row starts, document separators) and padding
        if not self.drop_bos:
            keep = np.arange(self.seq_len)[None, :] < np.array(self.rows_len)[:, None]
        meta = {"seq_len": self.seq_len, "drop_bos": self.drop_bos, "n_documents": self.n_documents}
        return PackedTokens(tokens, doc_ids, keep, self.bos, self.pad, meta)


def packed_corpus(
    tokenizer,
    name: str | None = None,
    split: str = "train",
    seq_len: int = 128,
    max_tokens: int | None = None,
    text_field: str = "text",
    drop_bos: bool = True,
    shuffle: bool = True,
    seed: int = 0,
) -> PackedTokens:
    """load_corpus + pack, recording the corpus and how its documents were sampled in the result's
    meta.

    shuffle (default): documents in a seeded random order (see sample_documents), so a small
    `max_tokens` is a sample of the whole split; shuffle=False packs them in corpus order.
    """
    ds, rule = corpus_split(name, split=split, text_field=text_field)
    docs, sampling = sample_documents(ds, text_field, shuffle=shuffle, seed=seed)
    packed = pack(docs, tokenizer, seq_len=seq_len, max_tokens=max_tokens, drop_bos=drop_bos)
    packed.meta.update(
        {
            "corpus": name or BUNDLED,
            "split": split,
            "split_rule": rule,
            "text_field": text_field,
            "sampling": sampling,
        }
    )
    return packed
