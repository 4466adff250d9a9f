"""Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025): BatchTopK whose nested prefixes
of latent groups must each reconstruct the input on their own, so that early latents learn
general features."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..config import SAEConfigError, register, resolve_group_sizes
from .batchtopk import BatchTopKSAE


@register
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025): BatchTopK over the whole
    dictionary, and every nested prefix of latent groups must reconstruct the input on its own.

    The reconstruction term is the weighted mean of the prefixes' MSEs (SAELens sums them: the same
    up to a constant factor that Adam mostly absorbs). Inference as BatchTopK: one threshold θ.
    """

    arch, label, color = "matryoshka", "Matryoshka BatchTopK", "#ff7f0e"
    saelens_training_name = "matryoshka_batchtopk"
    has_prefixes = True

    @classmethod
    def check_config(cls, cfg):
        cfg.group_sizes = resolve_group_sizes(cfg.group_sizes, cfg.d_sae)
        if cfg.group_weights is not None and len(cfg.group_weights) != len(cfg.group_sizes):
            raise SAEConfigError(
                f"group_weights has {len(cfg.group_weights)} entries but there are "
                f"{len(cfg.group_sizes)} groups; give one weight per group"
            )

    @property
    def widths(self) -> list[int]:
        """Cumulative prefix sizes, e.g. [288, 576, 1152, 2304, 4608]."""
        return list(itertools.accumulate(self.cfg.group_sizes))

    def _weights(self) -> list[float]:
        w = [float(v) for v in self.cfg.group_weights or [1.0] * len(self.cfg.group_sizes)]
        return [v / sum(w) for v in w]

    def group_of(self, latents: torch.Tensor) -> torch.Tensor:
        """Group index of each latent index."""
        return torch.bucketize(
            latents, torch.tensor(self.widths, device=latents.device), right=True
        )

    def recon_loss(self, xs, x_hat, z):
        """The weighted mean of every prefix's MSE (the last prefix is the whole dictionary:
        x_hat)."""
        parts = (
            z[:, lo:hi] @ self.W_dec[lo:hi] for lo, hi in zip([0, *self.widths], self.widths[:-1])
        )
        prefixes = list(itertools.accumulate(parts, initial=self.b_dec))[1:] + [x_hat]
        return self.prefix_loss(xs, prefixes)

    def prefix_loss(self, xs, prefixes: list[torch.Tensor]) -> torch.Tensor:
        """The weighted mean of the MSEs of every prefix's reconstruction, smallest prefix first."""
        return sum(w * F.mse_loss(p, xs) for w, p in zip(self._weights(), prefixes))

    def prefix(self, n_groups: int) -> BatchTopKSAE:
        """A BatchTopK SAE made of the first n_groups groups (same weights, same theta). In
        threshold mode its code is exactly this SAE's code restricted to those latents, so every
        metric (NMSE, CE recovered) of a prefix is the metric of this object."""
        if not 1 <= n_groups <= len(self.cfg.group_sizes):
            raise SAEConfigError(
                f"n_groups must be in 1..{len(self.cfg.group_sizes)} (got {n_groups})"
            )
        return self.first_latents(self.widths[n_groups - 1])

    def prefixes(self) -> list[BatchTopKSAE]:
        """Every nested prefix as its own SAE, smallest first (the last is the whole dictionary)."""
        return [self.prefix(g) for g in range(1, len(self.cfg.group_sizes) + 1)]
