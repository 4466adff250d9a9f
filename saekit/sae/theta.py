"""BatchTopK's inference threshold θ, estimated in one place.

In training BatchTopK keeps the batch's top batch*k pre-activations; its cut is the smallest one
kept. At inference there is no batch to rank, so a latent fires where its pre-activation is above
one global θ, an estimate of that cut: during training a running mean of the steps' cuts
(`running_update`), at the end re-estimated with the final weights (`estimate`), and on request
calibrated so that threshold mode gives an exact mean L0 (`estimate` pooled).
"""

from __future__ import annotations

import torch

from .selections import batch_topk


@torch.no_grad()
def running_update(
    theta: torch.Tensor, updates: torch.Tensor, cut: torch.Tensor, beta: float
) -> None:
    """θ takes one training step's cut, in place: θ += w (cut - θ), w = max(1 - beta, 1/n) at the
    n-th cut (the mean of the first cuts, then an exponential moving average)."""
    n = updates.add_(1)
    theta.lerp_(cut.to(theta.dtype), n.reciprocal().clamp_(min=1 - beta).to(theta.dtype))


@torch.no_grad()
def estimate(sae, batches, l0: float, n_tokens: int | None = None) -> tuple[float | None, int]:
    """θ for `sae`'s current weights from `batches` of inputs [B, d_in]: (θ, batches or tokens it
    saw).

    Without n_tokens: the mean over batches of each batch's cut, what training's running mean tracks
    (None where no batch had a positive entry). With n_tokens, the number of tokens the batches
    hold: the cut of them all pooled, halfway between the (n*l0)-th and the next largest
    pre-activation, so that threshold mode gives exactly l0 latents a token on them (None where
    fewer are positive); it holds at most n*l0 + 1 values at a time."""
    inputs = (sae.prepare(x.to(sae.W_dec.device)) for x in batches)
    if n_tokens is None:
        sels = (batch_topk(sae.pre_acts(xs), l0, row_major=False) for xs in inputs)
        cuts = [sel.cut for sel in sels if sel.cut is not None]
        return (float(torch.stack(cuts).float().mean()) if cuts else None), len(cuts)
    count = int(round(n_tokens * l0))
    pool, n = None, 0
    for xs in inputs:
        a = sae.pre_acts(xs).flatten()
        n += xs.shape[0]
        a = a[a > (pool.min() if pool is not None and pool.numel() > count else 0)]
        pool = a if pool is None else torch.cat([pool, a])
        if pool.numel() > count + 1:
            pool = pool.topk(count + 1, sorted=False).values
    if pool is None or pool.numel() <= count:
        return None, n
    top = pool.topk(count + 1).values
    return (float((top[count - 1] + top[count]) / 2) if count else float(top[0])), n
