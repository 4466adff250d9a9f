"""The first-letter task behind SAEBench's absorption evaluation: single-token alphabetic words from
the model's vocabulary, in-context prompts "{word} has the first letter: X", and the model's
activations at the word's token, captured once per model and hook and cached on disk."""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..plumbing.files import atomic_save_npy, atomic_write_json
from .output import BenchError

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"


@dataclass
class LetterData:
    """Words, their letters (0-25), whether each is in the probes' training split, and the
    model's activations x [n, d] at each word's token in its prompt."""

    words: list[str]
    letters: np.ndarray
    train: np.ndarray
    x: torch.Tensor
    skipped: dict[str, int]  # letters left out (too few words), with how many words they had

    def split(self, train: bool):
        keep = self.train if train else ~self.train
        return self.x[torch.from_numpy(keep)], self.letters[keep]


def alpha_words(tokenizer) -> list[str]:
    """Vocabulary entries that decode to letters only, after at most one leading space (SAEBench's
    `get_alpha_tokens`), in the vocabulary's id order."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = tokenizer.convert_tokens_to_string([token])
        bare = word[1:] if word.startswith(" ") else word
        if bare and all(c in string.ascii_letters for c in bare):
            words.append(word)
    return words


def prompt(word: str, examples: list[str]) -> str:
    """SAEBench's in-context prompt: a newline, then each example with its answer, then the word."""
    shots = [TEMPLATE.format(word=w) + " " + w.strip()[0].upper() for w in examples]
    return "\n" + "\n".join([*shots, TEMPLATE.format(word=word)])


def word_position(tokenizer, word: str) -> int:
    """Where the word's token sits in its prompt, counted from the end (SAEBench reads -6 for this
    template: the word, then " has the first letter:")."""
    tail = tokenizer(TEMPLATE.format(word=word).removeprefix(word), add_special_tokens=False)
    return -1 - len(tail["input_ids"])


def choose_words(
    tokenizer, max_words: int, min_per_letter: int, seed: int, train_fraction: float = 0.8
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, int]]:
    """Up to max_words words drawn evenly over the letters (seeded), their letter ids, a train
    mask (80% of each letter's words), and the letters skipped for having under min_per_letter
    words that stay one token inside a prompt."""
    rng = random.Random(seed)
    by_letter: dict[str, list[str]] = {c: [] for c in LETTERS}
    for word in alpha_words(tokenizer):
        by_letter[word.strip()[0].lower()].append(word)
    per_letter = max(max_words // len(LETTERS), 1)
    words, letters, train, skipped = [], [], [], {}
    for i, c in enumerate(LETTERS):
        pool = rng.sample(by_letter[c], len(by_letter[c]))
        chosen = [w for w in pool[: 3 * per_letter] if _one_token(tokenizer, w)][:per_letter]
        if len(chosen) < min_per_letter:
            skipped[c] = len(chosen)
            continue
        n_train = max(1, int(round(train_fraction * len(chosen))))
        words += chosen
        letters += [i] * len(chosen)
        train += [True] * n_train + [False] * (len(chosen) - n_train)
    if not words:
        raise BenchError(
            "the model's vocabulary has too few single-token alphabetic words for any letter; "
            "the absorption evaluation needs a tokenizer with whole-word tokens"
        )
    return words, np.array(letters), np.array(train), skipped


def _one_token(tokenizer, word: str) -> bool:
    ids = tokenizer("\n" + TEMPLATE.format(word=word), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[word_position(tokenizer, word)]) == word


def letter_data(
    model,
    hook: str,
    max_words: int = 3900,
    min_per_letter: int = 20,
    n_examples: int = 10,
    seed: int = 42,
    batch_size: int = 32,
    cache: str | Path | None = None,
    progress: bool = True,
) -> LetterData:
    """The first-letter data set at `hook`: words, prompts (each with n_examples in-context words
    from its own split) and the activations at each word's token. With `cache`, a second call with
    the same settings reads the activations back instead of running the model."""
    from ..activations import forward_hooks
    from ..models import model_name, resolve_hook, underlying

    tok = model.tokenizer
    words, letters, train, skipped = choose_words(tok, max_words, min_per_letter, seed)
    key = dict(model=model_name(model), hook=hook, words=words, n_examples=n_examples, seed=seed)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = Path(cache) / f"letters_{digest}.npy" if cache is not None else None
    if path is not None and path.exists():
        x = torch.from_numpy(np.load(path))
        return LetterData(words, letters, train, x, skipped)
    rng = random.Random(seed)
    pools = {
        True: [w for w, t in zip(words, train) if t],
        False: [w for w, t in zip(words, train) if not t],
    }
    texts = []
    for w, t in zip(words, train):
        pool = pools[bool(t)]
        others = rng.sample(pool, min(n_examples + 1, len(pool)))  # one spare: w may be drawn
        texts.append(prompt(w, [o for o in others if o != w][:n_examples]))
    hp = resolve_hook(model, hook)
    device = next(underlying(model).parameters()).device
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(ids):  # equal lengths batch without padding
        by_length.setdefault(len(row), []).append(i)
    batches = [
        g[b : b + batch_size] for g in by_length.values() for b in range(0, len(g), batch_size)
    ]
    x = None
    for idx in tqdm(batches, desc="absorption: prompts", disable=not progress):
        acts = forward_hooks(model, torch.tensor([ids[i] for i in idx], device=device), [hp])[0]
        pos = torch.tensor([word_position(tok, words[i]) for i in idx]) + acts.shape[1]
        if x is None:
            x = torch.empty(len(words), acts.shape[-1])
        x[idx] = acts[torch.arange(len(idx)), pos].float().cpu()
    if path is not None:
        atomic_save_npy(path, x.numpy())
        atomic_write_json(path.with_suffix(".json"), key)
    return LetterData(words, letters, train, x, skipped)
