"""Text corpora through `datasets`, tokenised with BOS and packed into fixed-length sequences.

Every packed position keeps its token id and its document index, so any activation can be traced
back to (sequence, position, token) and to the text around it. Documents are drawn in a seeded
random order (a shuffle buffer for streamed hub data), so the first N tokens sample the whole corpus
or split rather than its first documents.

    corpus.py   corpora (bundled, local files, hub ids), their splits, documents in a seeded order
    packing.py  tokenised and packed sequences that remember each token's document
"""

from __future__ import annotations

from .corpus import (
    BUNDLED,
    HELD_OUT_EVERY,
    LOCAL_SPLIT_SEED,
    LOCAL_TEST_FRACTION,
    SHUFFLE_BUFFER,
    SPLIT_NAMES,
    CorpusError,
    bundled_corpus_path,
    corpus_split,
    iter_documents,
    iter_texts,
    load_corpus,
    local_split,
    sample_documents,
)
from .packing import PackedTokens, pack, packed_corpus, tokens_sha256

__all__ = [
    "BUNDLED",
    "CorpusError",
    "HELD_OUT_EVERY",
    "LOCAL_SPLIT_SEED",
    "LOCAL_TEST_FRACTION",
    "PackedTokens",
    "SHUFFLE_BUFFER",
    "SPLIT_NAMES",
    "bundled_corpus_path",
    "corpus_split",
    "iter_documents",
    "iter_texts",
    "load_corpus",
    "local_split",
    "pack",
    "packed_corpus",
    "sample_documents",
    "tokens_sha256",
]
