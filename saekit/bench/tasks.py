"""Sparse probing's tasks on the bundled corpus, and the contexts they are read from: each document
is cut into up to `contexts_per_document` contexts of `context_length` tokens (BOS first); the
model's activations at the hook are captured once per model and hook and cached on disk. Documents,
not contexts, are split into train and test, so no document is on both sides."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..plumbing.files import atomic_save_npy, atomic_write_json
from .output import BenchError

LABELS = ("author", "genre", "title")


@dataclass(frozen=True)
class Task:
    """A balanced binary task: contexts of documents matching `positive` against those matching
    `negative` (None: every other document). Each is {label column: allowed values}."""

    dataset: str
    name: str
    positive: dict
    negative: dict | None = None


TASKS = (
    Task("author", "Shakespeare", {"author": ["William Shakespeare"]}),
    Task("author", "King James Version", {"author": ["King James Version (1611)"]}),
    Task("author", "Milton", {"author": ["John Milton"]}),
    Task("author", "Britannica", {"author": ["Encyclopaedia Britannica (1911)"]}),
    *(Task("genre", g, {"genre": [g]}) for g in ("drama", "scripture", "encyclopedia", "verse")),
    Task("genre", "essay", {"genre": ["essay"]}),
    Task("work", "Hamlet vs Macbeth", {"work": ["Hamlet"]}, {"work": ["Macbeth"]}),
    Task(
        "work",
        "Twelfth Night vs The Tempest",
        {"work": ["Twelfth Night"]},
        {"work": ["The Tempest"]},
    ),
    Task("work", "Psalms vs Proverbs", {"work": ["Psalms"]}, {"work": ["Proverbs"]}),
    Task("work", "Luke vs Acts", {"work": ["Luke"]}, {"work": ["Acts"]}),
    Task("form", "verse vs prose", {"genre": ["verse"]}, {"genre": ["essay", "encyclopedia"]}),
)


@dataclass
class ProbingData:
    """Contexts: token ids [n, T], kept positions [n, T] (no BOS, no padding), each context's
    document [n], the model's activations at every position [n, T, d] (float16) and mean-pooled
    over the kept ones [n, d]; the documents' labels and which documents are test."""

    tokens: np.ndarray
    keep: np.ndarray
    doc: np.ndarray
    tokens_x: np.ndarray
    pooled: torch.Tensor
    docs: pd.DataFrame
    test_doc: np.ndarray
    separators: dict = field(default_factory=dict)  # task -> (token, balanced accuracy)

    def matches(self, where: dict) -> np.ndarray:
        """Which contexts' documents match {column: values}."""
        ok = np.ones(len(self.docs), dtype=bool)
        for column, values in where.items():
            ok &= self.docs[column].isin(values).to_numpy()
        return ok[self.doc]

    def labels(self, task: Task, rows: np.ndarray) -> np.ndarray:
        return self.matches(task.positive)[rows].astype(np.int64)


def documents(corpus: str | None) -> pd.DataFrame:
    """The corpus's documents with their labels and work (a title without its chapter number);
    a corpus without the labels the tasks need is an error that says which are missing."""
    from ..data import load_corpus

    frame = load_corpus(corpus, split="all").to_pandas()
    missing = [c for c in LABELS if c not in frame.columns]
    if missing:
        raise BenchError(
            f"the corpus {corpus or 'bundled'} has no {', '.join(missing)} column: sparse "
            f"probing's tasks are built from {', '.join(LABELS)} labels; use the bundled corpus "
            "(--corpus bundled) or a corpus with those columns"
        )
    frame["work"] = [re.sub(r" \d+$", "", t) for t in frame["title"]]
    return frame.reset_index(drop=True)


def contexts(tokenizer, docs: pd.DataFrame, length: int, per_doc: int, min_tokens: int = 32):
    """Up to per_doc contexts of `length` tokens (BOS, then the document's next tokens) from every
    document, right-padded; a last piece shorter than min_tokens is left out."""
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    rows, keep, doc = [], [], []
    for i, text in enumerate(docs["text"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, per_doc * (length - 1), length - 1):
            piece = ids[start : start + length - 1]
            if len(piece) < min_tokens:
                break
            rows.append([bos, *piece] + [pad] * (length - 1 - len(piece)))
            keep.append([False] + [True] * len(piece) + [False] * (length - 1 - len(piece)))
            doc.append(i)
    return np.array(rows, dtype=np.int64), np.array(keep), np.array(doc)


def probing_data(model, hook: str, corpus: str | None, cfg, cache=None, progress=True):
    """The contexts of every document and the model's activations on them at `hook` (read back
    from `cache` when captured before with the same settings)."""
    from ..activations import forward_hooks
    from ..models import model_name, resolve_hook, underlying

    docs = documents(corpus)
    tokens, keep, doc = contexts(
        model.tokenizer, docs, cfg.context_length, cfg.contexts_per_document
    )
    rng = np.random.default_rng(cfg.random_seed)
    test_doc = rng.random(len(docs)) < cfg.test_fraction
    key = {"model": model_name(model), "hook": hook, "tokens": hashlib.sha256(tokens).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache) / f"probing_{digest}.npy" if cache is not None else None
    if path is not None and path.exists():
        x = np.load(path, mmap_mode="r")
    else:
        hp = resolve_hook(model, hook)
        device = next(underlying(model).parameters()).device
        x = None
        batch = cfg.llm_batch_size
        for b in tqdm(
            range(0, len(tokens), batch), desc="sparse probing: contexts", disable=not progress
        ):
            acts = forward_hooks(model, torch.from_numpy(tokens[b : b + batch]).to(device), [hp])[0]
            if x is None:
                x = np.empty((len(tokens), tokens.shape[1], acts.shape[-1]), dtype=np.float16)
            x[b : b + batch] = acts.float().cpu().numpy().astype(np.float16)
        if path is not None:
            atomic_save_npy(path, x)
            atomic_write_json(path.with_suffix(".json"), key)
    pooled = torch.stack(
        [
            torch.from_numpy(np.asarray(x[i][keep[i]], dtype=np.float32)).mean(0)
            for i in range(len(x))
        ]
    )
    data = ProbingData(tokens, keep, doc, x, pooled, docs, test_doc)
    for task in TASKS:
        data.separators[task.name] = one_token_separator(task, data, cfg, model.tokenizer)
    return data


def task_rows(task: Task, data: ProbingData, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Balanced train and test contexts of a task: as many negatives as positives (at most
    probe_train_set_size / probe_test_set_size in all), drawn with the task's own seed."""
    pos = data.matches(task.positive)
    neg = data.matches(task.negative) if task.negative is not None else ~pos
    seed = cfg.random_seed + int(hashlib.sha256(task.name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    out = []
    for is_test, size in ((False, cfg.probe_train_set_size), (True, cfg.probe_test_set_size)):
        side = data.test_doc[data.doc] == is_test
        p, n = np.nonzero(pos & side)[0], np.nonzero(neg & side)[0]
        m = min(len(p), len(n), size // 2)
        if m < 2:
            raise BenchError(
                f"sparse probing task '{task.name}' has {len(p)} positive and {len(n)} negative "
                f"{'test' if is_test else 'train'} contexts; the corpus needs documents of both"
            )
        out.append(
            np.sort(
                np.concatenate([rng.choice(p, m, replace=False), rng.choice(n, m, replace=False)])
            )
        )
    return out[0], out[1]


def one_token_separator(task: Task, data: ProbingData, cfg, tokenizer) -> tuple[str, float]:
    """The single token whose presence in a context best tells the task's classes apart on its
    training contexts, and that rule's balanced accuracy."""
    train, _ = task_rows(task, data, cfg)
    y = data.labels(task, train).astype(bool)
    present = {}
    for row, label in zip(train, y):
        for t in set(data.tokens[row][data.keep[row]].tolist()):
            present.setdefault(t, [0, 0])[int(label)] += 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    best, best_acc = None, 0.0
    for t, (neg_with, pos_with) in present.items():
        acc = 0.5 * (pos_with / n_pos + (n_neg - neg_with) / n_neg)
        acc = max(acc, 1 - acc)  # absence can be the sign too
        if acc > best_acc:
            best, best_acc = t, acc
    return tokenizer.decode([best]), best_acc
