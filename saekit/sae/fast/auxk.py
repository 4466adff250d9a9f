"""AuxK on the sparse path: the dead latents' columns alone (B x n_dead x d_in each way, small while
few latents are dead), their gradients folded into the sparse encoder's and decoder's
(autograd.DeadColumns). The same values and gradients as the reference path's `SAE.aux_code` on
the full pre-activations."""

from __future__ import annotations

import torch

from ..step import Step
from .autograd import DeadColumns
from .hints import Plan
from .select import slots

AUX_UNIT = 64  # AuxK's slots are a multiple of this


def padded(sae, plan: Plan) -> bool:
    """Whether AuxK takes its dead latents in slots padded with -1: a recorded step's fixed number,
    or under bf16 autocast on the CPU, where oneDNN keeps a compiled kernel per product shape and
    exact shapes would follow the dead count from step to step (tests/train/test_scale.py watches
    the memory this grew)."""
    cpu_bf16 = sae.W_dec.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    return plan.aux_slots is not None or cpu_bf16


def dead_latents(sae, step: Step, plan: Plan, pad: bool) -> torch.Tensor | None:
    """The dead latents' indices where AuxK has work this step, else None; padded with -1 to their
    slots where `pad`. Their number is the plan's `n_dead` where the trainer knows it (no
    read-back here)."""
    if not sae.aux_wanted(step):
        return None
    n_dead = plan.n_dead
    if pad:
        room = plan.aux_slots
        if room is None:
            n_dead = int(sae.dead_mask().sum()) if n_dead is None else n_dead
            room = slots(n_dead, AUX_UNIT, sae.cfg.d_sae)
        return (
            torch.nonzero_static(sae.dead_mask(), size=room, fill_value=-1).squeeze(1)
            if room
            else None
        )
    if n_dead is not None:
        return torch.nonzero_static(sae.dead_mask(), size=n_dead).squeeze(1) if n_dead else None
    dead = sae.dead_mask().nonzero().squeeze(1)
    return dead if dead.numel() else None


def aux_reconstruction(
    sae, xc: torch.Tensor, idx: torch.Tensor, pad: bool, fold=None
) -> torch.Tensor:
    """AuxK's reconstruction from the dead latents `idx` alone: their pre-activations again, each
    row's k_aux largest positive ones kept, decoded. xc: the normalised input less b_dec,
    differentiable to b_dec. pad: idx is padded with -1 (those slots give nothing). fold: (the main
    code's CodeIndex, its values, its reconstruction, the CodeIndex its decode read): the dead
    columns' gradients then add into the sparse encoder's and decoder's."""
    rows = idx.clamp_min(0) if pad else idx  # padding reads latent 0, then its columns are zeroed
    # the dead latents as rows of W_enc_t: their gradient comes in the parameter's own layout
    if fold is None:
        W_enc, b_enc, W_dec = sae.W_enc_t[rows], sae.b_enc[rows], sae.W_dec[rows]
    else:
        W_enc, b_enc, W_dec = DeadColumns.apply(sae.W_enc_t, sae.b_enc, sae.W_dec, rows, *fold)
    a = torch.mm(xc, W_enc.t()).add_(b_enc).relu_()
    if pad:
        # a zero is never among a row's k_aux largest unless it adds nothing
        a = a.masked_fill(idx < 0, 0)
    if idx.numel() > sae.cfg.k_aux:
        vals, pos = a.topk(sae.cfg.k_aux, dim=-1, sorted=False)
        a = torch.zeros_like(a).scatter(-1, pos, vals)
    return a @ W_dec
