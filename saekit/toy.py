"""Synthetic superposition data with known ground truth: for teaching and for correctness tests.

n unit feature directions in d < n dimensions; each sample mixes a *variable* number of them
(Poisson or heavy-tailed counts) with positive coefficients, plus Gaussian noise. BatchTopK can
follow that variable count; TopK cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ToyData:
    x: torch.Tensor  # [n_samples, d] samples
    features: torch.Tensor  # [n_features, d] ground-truth unit directions
    active: torch.Tensor  # [n_samples, n_features] bool: which features are on in each sample
    coeffs: torch.Tensor  # [n_samples, n_features] their coefficients (0 where off)

    @property
    def n_active(self) -> torch.Tensor:
        """[n_samples] true number of active features per sample."""
        return self.active.sum(-1)


def make_toy(
    n_samples: int = 20_000,
    d: int = 64,
    n_features: int = 256,
    mean_active: float = 6.0,
    counts: str = "poisson",
    freq_decay: float = 0.5,
    coeff_range: tuple[float, float] = (0.5, 1.5),
    noise: float = 0.01,
    seed: int = 0,
) -> ToyData:
    """Make superposition data.

    counts: "poisson" (count ~ Poisson(mean_active)) or "heavy" (geometric: many small, a long
    tail).
    freq_decay: feature i is chosen with weight (i+1)^-freq_decay (0: all equally frequent).
    """
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=-1, keepdim=True)
    if counts == "poisson":
        n_act = torch.poisson(torch.full((n_samples,), float(mean_active)), generator=g).long()
    elif counts == "heavy":
        p = 1.0 / (1.0 + mean_active)
        u = torch.rand(n_samples, generator=g).clamp_min(1e-12)
        n_act = torch.floor(torch.log(u) / torch.log(torch.tensor(1 - p))).long()
    else:
        raise ValueError(f"unknown counts '{counts}'; use 'poisson' or 'heavy'")
    n_act = n_act.clamp(1, n_features)
    # choose n_act[i] distinct features per sample, weighted by frequency: Gumbel
    # top-k with a per-row k
    logw = -freq_decay * torch.log(torch.arange(1, n_features + 1, dtype=torch.float32))
    gumbel = -torch.log(
        -torch.log(torch.rand(n_samples, n_features, generator=g).clamp(1e-12, 1 - 1e-7))
    )
    keys = logw + gumbel
    rank = keys.argsort(dim=-1, descending=True).argsort(dim=-1)
    active = rank < n_act[:, None]
    lo, hi = coeff_range
    coeffs = (lo + (hi - lo) * torch.rand(n_samples, n_features, generator=g)) * active
    x = coeffs @ feats + noise * torch.randn(n_samples, d, generator=g)
    return ToyData(x, feats, active, coeffs)


def make_hierarchical_toy(
    n_samples: int = 20_000,
    d: int = 64,
    n_parents: int = 16,
    children_per_parent: int = 8,
    p_parent: float = 0.15,
    p_child: float = 0.8,
    child_scale: float = 0.6,
    coeff_range: tuple[float, float] = (0.5, 1.5),
    noise: float = 0.01,
    seed: int = 0,
) -> ToyData:
    """Features in a hierarchy: a parent fires with probability p_parent; a child of an active
    parent fires with probability p_child (one child at most) and never without its parent. Feature
    order: the n_parents parents, then the children of parent 0, of parent 1, ... (the situation
    that makes plain SAEs absorb parents into children; Matryoshka prefixes keep the parents)."""
    g = torch.Generator().manual_seed(seed)
    n_features = n_parents * (1 + children_per_parent)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=-1, keepdim=True)
    parents = torch.rand(n_samples, n_parents, generator=g) < p_parent
    has_child = parents & (torch.rand(n_samples, n_parents, generator=g) < p_child)
    which = torch.randint(0, children_per_parent, (n_samples, n_parents), generator=g)
    children = torch.zeros(n_samples, n_parents, children_per_parent, dtype=torch.bool)
    children.scatter_(2, which[..., None], has_child[..., None])
    active = torch.cat([parents, children.reshape(n_samples, -1)], dim=1)
    lo, hi = coeff_range
    scale = torch.cat([torch.ones(n_parents), torch.full((n_features - n_parents,), child_scale)])
    coeffs = (lo + (hi - lo) * torch.rand(n_samples, n_features, generator=g)) * scale * active
    x = coeffs @ feats + noise * torch.randn(n_samples, d, generator=g)
    return ToyData(x, feats, active, coeffs)


@torch.no_grad()
def feature_recovery(W_dec: torch.Tensor, features: torch.Tensor, threshold: float = 0.9) -> dict:
    """How well decoder rows [d_sae, d] match ground-truth features [n, d].

    mmcs: mean over true features of the max cosine to any decoder row; recovered: the fraction of
    true features with a decoder row at cosine >= threshold.
    """
    W = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    Fe = features / features.norm(dim=-1, keepdim=True)
    best = (Fe @ W.t()).max(dim=-1).values
    return {
        "mmcs": float(best.mean()),
        "recovered": float((best >= threshold).float().mean()),
        "best_cosine": best,
    }


@torch.no_grad()
def superposition_table(
    d: int = 16,
    features_per_dim=(0.5, 1, 2, 4, 8),
    active=(1, 3, 10),
    n_samples: int = 2000,
    seed: int = 0,
):
    """Superposition in numbers: n = ratio * d random unit feature directions in d dimensions.

    For each n: `max_cosine`, the mean over features of the largest |cosine| with another feature
    (interference grows as more features share the space); and for m features active per sample
    (unit coefficients), reading every feature back by projection onto its direction:
    `active_error`, the mean |read-out - 1| of the active ones, and `inactive_readout`, the mean
    |read-out| of the inactive ones (what a linear read-out sees that is not there). Both grow
    with m, hardly with n: many more features than dimensions fit while few are active."""
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    rows = []
    for ratio in features_per_dim:
        n = max(2, int(round(ratio * d)))
        feats = torch.randn(n, d, generator=g)
        feats /= feats.norm(dim=-1, keepdim=True)
        max_cosine = float(max_cosines(feats).mean())
        for m in active:
            if m > n:
                continue
            # m features per sample, uniformly
            on = torch.rand(n_samples, n, generator=g).argsort(-1) < m
            read = (on.float() @ feats) @ feats.T
            rows.append(
                {
                    "features_per_dim": ratio,
                    "n_features": n,
                    "active": m,
                    "max_cosine": max_cosine,
                    "active_error": float((read[on] - 1).abs().mean()),
                    "inactive_readout": float(read[~on].abs().mean()) if m < n else float("nan"),
                }
            )
    return pd.DataFrame(rows)


@torch.no_grad()
def batch_dependence(sae, x: torch.Tensor, sample: int = 0, batch_size: int = 32, seed: int = 0):
    """Why BatchTopK needs its threshold θ at inference: sample `sample` of x goes into two batches
    of other random samples; each batch is encoded in batch mode (training's selection: the
    batch_size*k largest of the whole batch) and in threshold mode. Returns one row per (mode,
    batch): the sample's active latents. In batch mode the sample's code depends on its
    neighbours; with θ it is its own."""
    import pandas as pd

    g = torch.Generator().manual_seed(seed)
    others = torch.cat([torch.arange(sample), torch.arange(sample + 1, len(x))])
    rows = []
    for b in ("A", "B"):
        pick = others[torch.randperm(len(others), generator=g)[: batch_size - 1]]
        batch = torch.cat([x[sample : sample + 1], x[pick]])
        for mode in sae.modes:
            z = sae.encode(batch, mode=mode)[0]
            idx = torch.nonzero(z).reshape(-1).tolist()
            rows.append({"mode": mode, "batch": b, "active": len(idx), "latents": idx})
    return pd.DataFrame(rows)


@torch.no_grad()
def max_cosines(directions: torch.Tensor, chunk: int = 4096):
    """For each row of [n, d] directions, the largest |cosine| with any other row (computed in
    chunks, so a dictionary of tens of thousands of latents fits in memory). Returns a numpy
    array [n]."""
    W = directions.detach().float().cpu()
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = torch.empty(len(W))
    for s in range(0, len(W), chunk):
        c = (W[s : s + chunk] @ W.T).abs()
        c[torch.arange(len(c)), torch.arange(s, s + len(c))] = 0
        out[s : s + chunk] = c.max(-1).values
    return out.numpy()
