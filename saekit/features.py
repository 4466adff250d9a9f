"""The feature index behind the dashboards: a store's codes grouped by latent, with what a feature
view shows (top examples with their contexts shaded, quantile groups, density, neighbours by decoder
cosine and by firing together, search)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import ActivationStore
from .sae import SAE


@dataclass
class FeatureIndex:
    """Sparse codes of a store's first n tokens, grouped by latent, plus what the explorer shows."""

    # [nnz] store row of each activation, sorted by latent then activation (descending)
    rows: np.ndarray
    latents: np.ndarray  # [nnz]
    values: np.ndarray  # [nnz]
    starts: np.ndarray  # [d_sae + 1] slice of each latent in the arrays above
    positions: np.ndarray  # [n, 2] (sequence, position) of each store row
    tokens: np.ndarray  # [n_seq, seq_len] token ids
    n_tokens: int
    decoder: torch.Tensor  # [d_sae, d_in] decoder rows (for neighbours and logit effects)
    token_strings: list | None = None  # id -> readable token, filled by the builder

    @property
    def d_sae(self) -> int:
        return len(self.starts) - 1

    def activations(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(store rows, values) where the latent fires, strongest first."""
        s, e = self.starts[latent], self.starts[latent + 1]
        return self.rows[s:e], self.values[s:e]

    @property
    def density(self) -> np.ndarray:
        """[d_sae] fraction of tokens on which each latent fires."""
        return np.diff(self.starts) / self.n_tokens

    def context(
        self, row: int, window: int = 24, after: int = 8, latent: int | None = None
    ) -> dict:
        """The tokens around a store row (`window` before, `after` after); with `latent`, that
        latent's activation on every one of them ("values", 0 where it does not fire or the token
        is outside the index)."""
        seq, pos = (int(v) for v in self.positions[row])
        lo, hi = max(0, pos - window), min(self.tokens.shape[1], pos + after + 1)
        ids = self.tokens[seq, lo:hi].tolist()
        out = {
            "sequence": seq,
            "position": pos,
            "tokens": [self.token_strings[i] for i in ids],
            "focus": pos - lo,
            "token_ids": ids,
        }
        if latent is not None:
            r = self._row_of[seq, lo:hi]
            lookup = self._values_of(latent)
            out["values"] = [lookup.get(int(x), 0.0) if x >= 0 else 0.0 for x in r]
        return out

    @property
    def _row_of(self) -> np.ndarray:
        """[n_seq, seq_len] store row of each (sequence, position) in the index, -1 elsewhere."""
        if getattr(self, "_rows_cache", None) is None:
            m = np.full(self.tokens.shape, -1, dtype=np.int64)
            m[self.positions[:, 0], self.positions[:, 1]] = np.arange(len(self.positions))
            self._rows_cache = m
        return self._rows_cache

    def _values_of(self, latent: int) -> dict:
        rows, vals = self.activations(latent)
        return dict(zip(rows.tolist(), vals.tolist()))

    def top_examples(
        self, latent: int, n: int = 20, window: int = 24, after: int = 8
    ) -> list[dict]:
        """The latent's strongest firings, each with its context shaded by the latent's
        activation."""
        rows, vals = self.activations(latent)
        return [
            {**self.context(int(r), window, after, latent), "activation": float(v)}
            for r, v in zip(rows[:n], vals[:n])
        ]

    def quantile_groups(
        self,
        latent: int,
        n_bins: int = 4,
        per_bin: int = 3,
        window: int = 24,
        after: int = 8,
        seed: int = 0,
    ) -> list[dict]:
        """The latent's firings in activation-quantile groups, strongest first: each with its
        activation range, its share of the firings and a few random examples, to see the whole
        range and not only the top."""
        rows, vals = self.activations(latent)
        if len(vals) == 0:
            return []
        rng = np.random.default_rng(seed)
        edges = np.quantile(vals, np.linspace(0, 1, n_bins + 1))
        groups = []
        for b in range(n_bins - 1, -1, -1):
            inside = (vals >= edges[b]) & (
                (vals < edges[b + 1]) if b < n_bins - 1 else (vals <= edges[b + 1])
            )
            sel = np.nonzero(inside)[0]
            pick = rng.choice(sel, size=min(per_bin, len(sel)), replace=False) if len(sel) else []
            groups.append(
                {
                    "bin": b,
                    "range": (float(edges[b]), float(edges[b + 1])),
                    "share": len(sel) / len(vals),
                    "examples": [
                        {
                            **self.context(int(rows[i]), window, after, latent),
                            "activation": float(vals[i]),
                            "bin": b,
                        }
                        for i in pick
                    ],
                }
            )
        return groups

    def quantile_examples(
        self,
        latent: int,
        n_bins: int = 4,
        per_bin: int = 3,
        window: int = 24,
        after: int = 8,
        seed: int = 0,
    ) -> list[dict]:
        """The examples of quantile_groups in one list (strongest group first)."""
        return [
            e
            for g in self.quantile_groups(latent, n_bins, per_bin, window, after, seed)
            for e in g["examples"]
        ]

    def neighbours(self, latent: int, n: int = 5) -> list[tuple[int, float]]:
        """Latents whose decoder rows are closest in cosine."""
        W = torch.nn.functional.normalize(self.decoder, dim=-1)
        cos = W @ W[latent]
        cos[latent] = -2
        v, i = cos.topk(n)
        return [(int(a), float(b)) for a, b in zip(i, v)]

    def coactivation_neighbours(self, latent: int, n: int = 5) -> list[tuple[int, float]]:
        """Latents that fire on the same tokens: (latent, share of this latent's firings where it
        fires too)."""
        rows, _ = self.activations(latent)
        if len(rows) == 0:
            return []
        if getattr(self, "_by_row", None) is None:  # the index regrouped by store row, once
            order = np.argsort(self.rows, kind="stable")
            self._by_row = (
                self.latents[order],
                np.searchsorted(self.rows[order], np.arange(self.n_tokens + 1)),
            )
        lat_by_row, starts = self._by_row
        together = np.concatenate([lat_by_row[starts[r] : starts[r + 1]] for r in rows])
        counts = np.bincount(together, minlength=self.d_sae).astype(float)
        counts[latent] = -1
        best = np.argsort(-counts, kind="stable")[:n]
        return [(int(j), counts[j] / len(rows)) for j in best if counts[j] > 0]

    def search_text(
        self, query: str, n: int = 20, examples: int = 10, where: str = "token"
    ) -> list[int]:
        """Latents whose top examples contain `query` (case-insensitive), densest first: in the
        firing token itself (where="token") or anywhere in the example's context
        (where="context", the window of `context`)."""
        q = query.lower()
        hits = []
        for lat in np.argsort(-self.density):
            rows, _ = self.activations(int(lat))
            if where == "context":
                toks = ["".join(self.context(int(r))["tokens"]) for r in rows[:examples]]
            else:
                toks = [
                    self.token_strings[self.tokens[tuple(self.positions[r])]]
                    for r in rows[:examples]
                ]
            if any(q in t.lower() for t in toks):
                hits.append(int(lat))
                if len(hits) >= n:
                    break
        return hits


@torch.no_grad()
def build_feature_index(
    sae: SAE,
    store: ActivationStore,
    n_tokens: int = 20_000,
    batch_size: int = 2048,
    mode: str | None = None,
    tokenizer=None,
    progress: bool = True,
    hook: str | None = None,
    allow_mismatch: bool = False,
) -> FeatureIndex:
    """Encode the store's first n_tokens once (with a progress bar) and group activations by latent.
    The store must hold the SAE's hook of the SAE's model (saekit.plumbing.checks) unless
    allow_mismatch."""
    from .plumbing.checks import hook_on_store

    n = min(n_tokens, len(store))
    batches = store.head_batches(n, batch_size, hook_on_store(sae, store, hook, allow_mismatch))
    rows, cols, vals = [], [], []
    for s, x in zip(
        tqdm(range(0, n, batch_size), desc="feature index", disable=not progress), batches
    ):
        z = sae.encode(x.to(sae.W_enc.device), mode=mode).cpu()
        r, c = z.nonzero(as_tuple=True)
        rows.append((r + s).numpy())
        cols.append(c.numpy())
        vals.append(z[r, c].numpy())
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    order = np.lexsort((-vals, cols))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(cols, np.arange(sae.cfg.d_sae + 1))
    tokens = np.asarray(store.tokens)
    if tokenizer is not None:
        strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        strings = [
            tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in strings
        ]
    else:
        strings = [str(i) for i in range(int(tokens.max()) + 1)]
    return FeatureIndex(
        rows,
        cols,
        vals,
        starts,
        store.positions()[:n],
        tokens,
        n,
        sae.W_dec.detach().cpu(),
        strings,
    )
