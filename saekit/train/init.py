"""An SAE's start from a sample of the data: the dataset-wide input scale, b_dec at the sample's
geometric median (or mean), and the architecture's own start (JumpReLU's thresholds at the target
L0)."""

from __future__ import annotations

import math

import torch


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * max(1.0, float(y.norm())):
            return y_new
        y = y_new
    return y


@torch.no_grad()
def from_sample(sae, sample: torch.Tensor, b_dec_init: str) -> None:
    """Initialise `sae` from a sample of inputs [n, d_in] on its device."""
    if sae.cfg.normalize == "dataset":
        sae.input_scale.fill_(
            math.sqrt(sae.cfg.d_in / sample.pow(2).sum(-1).mean().clamp_min(1e-12).item())
        )
    xs, _ = sae.normalize_input(sample)
    if b_dec_init == "geometric_median":
        sae.b_dec.data = geometric_median(xs)
    elif b_dec_init == "mean":
        sae.b_dec.data = xs.mean(0)
    sae.init_from_data(xs)
