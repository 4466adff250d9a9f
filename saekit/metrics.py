"""Reconstruction and sparsity metrics, defined once (see DESIGN.md) and used everywhere."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from .sae import SAE

DENSE_FRACTION = 0.10  # a latent firing on more than 10% of tokens is "dense"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x||^2"""
    return float((x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (1 - explained variance)"""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean per-token cosine similarity of x and x_hat."""
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


class _Accumulator:
    """Streams batches and keeps the sums the metrics need."""

    def __init__(self, d_sae: int):
        self.err = self.norm = self.cos = 0.0
        self.sum_x = None
        self.sum_x2 = 0.0
        self.n = 0
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.l0: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.err += float((x - x_hat).pow(2).sum())
        self.norm += float(x.pow(2).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_x2 += float(x.pow(2).sum())
        self.n += x.shape[0]
        active = z != 0
        self.fires += active.sum(0).cpu()
        self.l0.append(active.sum(-1).cpu())

    def result(self) -> dict:
        var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n  # sum ||x - mean||^2
        per_token = torch.cat(self.l0).float()
        density = self.fires.double() / self.n
        q = torch.quantile(per_token, torch.tensor(QUANTILES)).tolist()
        return {
            "n_tokens": self.n,
            "nmse": self.err / max(self.norm, 1e-30),
            "fvu": self.err / max(var, 1e-30),
            "explained_variance": 1 - self.err / max(var, 1e-30),
            "cosine": self.cos / self.n,
            "l0": float(per_token.mean()),
            "l0_std": float(per_token.std()) if per_token.numel() > 1 else 0.0,
            "l0_quantiles": {str(k): v for k, v in zip(QUANTILES, q)},
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((density > DENSE_FRACTION).double().mean()),
            "_per_token_l0": per_token,
            "_density": density,
        }


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable[torch.Tensor], mode: str | None = None,
                           device: str | torch.device | None = None) -> dict:
    """NMSE, FVU, cosine, L0 (mean, std, quantiles), dead and dense fractions over batches of x.

    BatchTopK uses threshold mode unless mode="batch", so results do not depend on batch size.
    Keys starting with "_" hold tensors: per-token L0 and per-latent firing density.
    """
    device = device or next(sae.parameters()).device
    was_training = sae.training
    sae.eval()
    acc = _Accumulator(sae.cfg.d_sae)
    try:
        for x in batches:
            x = x.to(device).float()
            z, x_hat = sae(x, mode=mode)
            acc.add(x, x_hat, z)
    finally:
        sae.train(was_training)
    if acc.n == 0:
        raise ValueError("no activations to evaluate")
    return acc.result()


def l0_histogram(per_token_l0: torch.Tensor, max_bins: int = 200) -> dict:
    """Histogram data of per-token latent counts: {"count": [...], "tokens": [...]}."""
    v = per_token_l0.long().numpy()
    top = int(min(v.max(initial=0), max_bins))
    counts = np.bincount(np.clip(v, 0, top), minlength=top + 1)
    return {"count": list(range(top + 1)), "tokens": counts.tolist()}


def public(metrics: dict) -> dict:
    """The JSON-safe part of a metrics dict (drops tensor-valued keys)."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}
