"""Dead latents and AuxK (Gao et al. 2024), the part of the SAE base that keeps latents alive: each latent's
count of tokens since it last fired, the dead set found without a read-back where the trainer already knows its
size, and AuxK's two implementations (the fast path's over the dead columns only, the reference path's over the
full pre-activations). `DeadLatents` is mixed into `saekit.sae.base.SAE`."""
from __future__ import annotations

import torch


def aux_bucket(n_dead: int, d_sae: int) -> int:
    """AuxK's slots for n_dead dead latents on the CPU under bf16 (DeadLatents._aux_padded): n_dead rounded up on
    a grid of 8 to 16 sizes an octave (multiples of 64 below 1,024), so at most 12.5% more columns above 512, and
    at most d_sae."""
    unit = max(64, 1 << max(0, int(n_dead).bit_length() - 4))
    return min(d_sae, unit * -(-int(n_dead) // unit))


class DeadLatents:
    """Mixed into SAE: uses its cfg (dead_tokens, k_aux, aux_alpha), uses_auxk, aux_due, the buffer
    tokens_since_fired and the encoder and decoder parameters."""

    _dead_known = None  # (number of dead latents, the counters tensor, its version) from set_dead_counters
    # set by a step recorded once and replayed (saekit.train.graphs): AuxK's dead latents as a fixed number of slots,
    # the dead ones first, then -1 (aux_reconstruction gives those nothing), so that the step's shapes do not follow
    # the dead count from step to step; 0: no AuxK this step. None: exactly the dead latents (_dead_known)
    aux_capacity: int | None = None

    def _aux_dead(self) -> torch.Tensor | None:
        """The dead latents' indices when AuxK has work this step (it is due, and some latent is dead), else None.
        Their number is the one `set_dead_counters` was given with the counters as they are now (the trainer
        reads it back with its one read-back of the previous step), so no read-back here; where the counters have
        changed since (loaded, set by hand) it is read back from the device."""
        if not self.aux_wanted():
            return None
        n_dead = self.known_dead_count()
        if self._aux_padded():  # the slots: a recorded step's, or on the CPU's bf16 grid for this dead count
            cap = self.aux_capacity
            if cap is None:
                n_dead = int(self.dead_mask().sum()) if n_dead is None else n_dead
                cap = aux_bucket(n_dead, self.cfg.d_sae) if n_dead else 0
            return torch.nonzero_static(self.dead_mask(), size=cap, fill_value=-1).squeeze(1) if cap else None
        if n_dead is not None:
            return torch.nonzero_static(self.dead_mask(), size=n_dead).squeeze(1) if n_dead else None
        dead = self.dead_mask().nonzero().squeeze(1)
        return dead if dead.numel() else None

    def _aux_padded(self) -> bool:
        """Whether the fast path's AuxK takes its dead latents in slots padded with -1: a recorded step's fixed number
        (aux_capacity), or under bf16 autocast on the CPU a size on aux_bucket's grid. There oneDNN keeps a compiled
        kernel (~0.7 MB) per bf16 product shape, up to 1,024 of them, and exact shapes follow the dead count from step
        to step (an epoch over a 512 MiB store grew the process by 1.2 GB so; tests/test_scale.py); on the grid a run
        meets a few dozen shapes, and AuxK's products run in bf16: ~4x faster than fp32 on an AMX CPU at
        [1,024 x 576] x [576 x 230] (0.2 vs 0.9 ms)."""
        return self.aux_capacity is not None or (self.W_dec.device.type == "cpu" and torch.is_autocast_enabled("cpu"))

    def aux_wanted(self) -> bool:
        """Whether AuxK runs this step at all: the architecture uses it, with a weight, and it is due."""
        return self.uses_auxk and self.cfg.aux_alpha > 0 and self.aux_due

    def _aux_dead_mask(self) -> tuple[torch.Tensor, int] | None:
        """The reference path's dead latents: (their mask, at most how many it marks) where AuxK has work this step,
        else None; as `_aux_dead`, read back only where the counters changed since set_dead_counters."""
        if not self.aux_wanted():
            return None
        n_dead = self.aux_capacity if self.aux_capacity is not None else self.known_dead_count()
        dead = self.dead_mask()
        n_dead = int(dead.sum()) if n_dead is None else n_dead
        return (dead, n_dead) if n_dead else None

    def known_dead_count(self) -> int | None:
        """The number of dead latents `set_dead_counters` was given, while the counters are still the tensor it set
        at the version it left (None where they have changed since: loaded, set by hand)."""
        counters, known = self.tokens_since_fired, self._dead_known
        if known is not None and known[1] is counters and known[2] == counters._version:
            return known[0]
        return None

    # -- the counters ---------------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def next_dead_counters(self, fired: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the counters after a step of n_tokens in which `fired` latents fired, how many latents they mark dead),
        both on the device; the counters themselves are left alone (set_dead_counters takes the new ones)."""
        # masked_fill_, not [fired] = 0: a mask index reads its size back
        since = (self.tokens_since_fired + n_tokens).masked_fill_(fired, 0)
        return since, (since >= self.cfg.dead_tokens).sum()

    @torch.no_grad()
    def set_dead_counters(self, since: torch.Tensor, n_dead: int | None = None) -> None:
        """Take new counters (next_dead_counters); n_dead, their number of dead latents read back by the caller,
        lets the next step's AuxK find the dead latents without a read-back of its own (see _aux_dead)."""
        self.tokens_since_fired.copy_(since)
        counters = self.tokens_since_fired
        self._dead_known = None if n_dead is None else (int(n_dead), counters, counters._version)

    # -- AuxK: one implementation per path ----------------------------------------------------
    def aux_reconstruction(self, xc: torch.Tensor, idx: torch.Tensor, fold=None) -> torch.Tensor:
        """Fast path's AuxK reconstruction from the dead latents alone, with dense matmuls over just their
        columns (B x n_dead x d_in each way: small while few latents are dead): their pre-activations again,
        each row's k_aux largest positive ones kept, decoded. The same values and gradients as the reference
        path's `aux_code` on the full pre-activations, at a fraction of the cost of routing B * k_aux more
        entries through the sparse encoder's backward (measured on 2 CPU cores at d_in=576, d_sae=4608,
        B=1024 with ~170 dead latents: AuxK's share of a step fell from ~25-30 ms to ~15 ms). idx: the dead
        latents (`_aux_dead`); with aux_capacity set, padded with -1 (slots that contribute nothing). xc: the
        normalised input less b_dec (SAE.centred_pre_acts), differentiable to b_dec. fold: (the main code's
        CodeIndex, its values, its reconstruction, the CodeIndex its decode read: another where it decodes by its
        own, as Matryoshka's): the dead columns' gradients then add into the sparse encoder's and decoder's
        (DeadColumns), where autograd would give each parameter a second gradient of its full size."""
        padded = self._aux_padded()
        slots = idx.clamp_min(0) if padded else idx  # padding reads latent 0, then its columns are zeroed
        # the dead latents as rows of W_enc_t: their gradient comes in the parameter's own layout and adds into the
        # sparse path's in place (indexing W_enc[:, idx] cost a transposing copy a step)
        if fold is None:
            W_enc, b_enc, W_dec = self.W_enc_t[slots], self.b_enc[slots], self.W_dec[slots]
        else:
            W_enc, b_enc, W_dec = DeadColumns.apply(self.W_enc_t, self.b_enc, self.W_dec, slots, *fold)
        a = torch.mm(xc, W_enc.t()).add_(b_enc).relu_()
        if padded:
            a = a.masked_fill(idx < 0, 0)  # a zero is never among a row's k_aux largest unless it adds nothing
        if idx.numel() > self.cfg.k_aux:
            vals, pos = a.topk(self.cfg.k_aux, dim=-1, sorted=False)
            a = torch.zeros_like(a).scatter(-1, pos, vals)
        return a @ W_dec

    def aux_code(self, a: torch.Tensor, dead: torch.Tensor, n_dead: int) -> torch.Tensor:
        """Reference path's AuxK code, dense [batch, d_sae]: each row's k_aux largest pre-activations of dead latents,
        zeros elsewhere (a: the relu'd pre-activations, differentiable). dead: the dead-latent mask [d_sae], n_dead:
        at most how many it marks (`_aux_dead_mask`). The entries are chosen without autograd and kept by a mask, so
        the backward is one multiply (as train_code's)."""
        with torch.no_grad():
            idx = torch.where(dead, a, 0).topk(min(self.cfg.k_aux, n_dead), dim=-1, sorted=False).indices
            keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True).logical_and_(dead)
        return a * keep


class DeadColumns(torch.autograd.Function):
    """The dead latents' rows of W_enc_t, b_enc and W_dec (`slots`) for AuxK, whose gradients are not handed to
    autograd, which would give each parameter a zero-filled gradient of its full size ([d_sae, d_in]; the fill of
    fresh pages and the add into the main gradient took ~7 ms of a 51 ms step on 2 CPU cores at 4,608 x 576, 5%
    dead). Backward leaves them on the main code's CodeIndex (`aux_grads`; on its decode's too where that has its
    own), and the sparse encoder's and decoder's backward add them into their own gradients (kernels.SparseEncode,
    SparseDecode) with index_add_. That those run after this one is made sure by the graph: this takes the main
    code's values and reconstruction as inputs (not read: their gradient from here is none), so autograd runs their
    backward after this node's."""

    @staticmethod
    def forward(ctx, W_enc_t, b_enc, W_dec, slots, index, vals, x_hat, dec_index=None):
        ctx.indexes = (index, index if dec_index is None else dec_index)  # the encoder's; the decode's
        ctx.save_for_backward(slots)
        return W_enc_t[slots], b_enc[slots], W_dec[slots]

    @staticmethod
    def backward(ctx, g_enc, g_b_enc, g_dec):
        (slots,) = ctx.saved_tensors
        for index in ctx.indexes:  # SparseEncode adds the encoder's two, SparseDecode W_dec's
            index.aux_grads = (slots, g_enc, g_b_enc, g_dec)
        return None, None, None, None, None, None, None, None
