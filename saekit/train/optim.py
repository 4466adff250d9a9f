"""The training step's small helpers, written lean: at small sizes a step is a few hundred small
kernels, and torch's versions spend more time in Python than in them (docs/speed.md); and at large
sizes the step is passes over [d_sae, d_in] tensors, so clipping is folded into the optimiser's
step (`clip_in_step`). Also the one read-back's stack of numbers."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def clip_in_step(
    opt: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_norm: float
) -> torch.Tensor:
    """clip_grad_norm_ folded into a fused optimiser's step: the total norm, and its scale handed to
    the optimiser as `grad_scale` (fused Adam divides each gradient by it as it reads it;
    GradScaler's channel), so the gradients are not rewritten in place first: two passes less over
    each [d_sae, d_in] gradient a step. The optimiser then steps as after clip_grad_norm_ (by
    max_norm / (norm + 1e-6), at most 1). Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        opt.grad_scale = None
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    opt.grad_scale = ((total + 1e-6) / max_norm).clamp_(min=1.0)
    return total


def drop_grads(params: Iterable[torch.Tensor]) -> None:
    """optimizer.zero_grad(set_to_none=True) for these parameters, without its profiler scope."""
    for p in params:
        p.grad = None


def stack_scalars(values: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """0-dim tensors of any dtypes (bool, integer, float) as one float64 vector (into `out` where
    given), by one
    operator: stacked into a float64 result, each converts exactly (a plain stack would promote to
    the widest float first: float32 rounds integers above 2**24). What a step reads back in one
    transfer."""
    out = (
        torch.empty(len(values), dtype=torch.float64, device=values[0].device)
        if out is None
        else out
    )
    return torch.stack([v.detach() for v in values], out=out)
