"""Dead latents and AuxK (Gao et al. 2024), the part of the SAE that keeps latents alive: each
latent's count of tokens since it last fired, and AuxK's code, each row's k_aux largest
pre-activations of dead latents, which must reconstruct what the main code missed. `DeadLatents` is
mixed into `saekit.sae.base.SAE`; the sparse path's AuxK (the same values and gradients, over the
dead columns only) is saekit.sae.fast.auxk."""

from __future__ import annotations

import torch

from .step import Step


class DeadLatents:
    """Mixed into SAE: uses its cfg (dead_tokens, k_aux, aux_alpha), uses_auxk and the buffer
    tokens_since_fired."""

    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired for cfg.dead_tokens tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def next_dead_counters(
        self, fired: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the counters after a step of n_tokens in which `fired` latents fired, how many latents
        they mark dead), both on the device; the counters themselves are left alone (the trainer
        copies the new ones in)."""
        # a mask index would read back
        since = (self.tokens_since_fired + n_tokens).masked_fill_(fired, 0)
        return since, (since >= self.cfg.dead_tokens).sum()

    def aux_wanted(self, step: Step) -> bool:
        """Whether AuxK runs this step: the architecture uses it, with a weight, and the step
        asks for it."""
        return self.uses_auxk and self.cfg.aux_alpha > 0 and step.aux

    def aux_dead_mask(self, step: Step) -> tuple[torch.Tensor, int] | None:
        """The dead latents where AuxK has work this step: (their mask, at most how many it
        marks), else None."""
        if not self.aux_wanted(step):
            return None
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        return (dead, n_dead) if n_dead else None

    def aux_code(self, a: torch.Tensor, dead: torch.Tensor, n_dead: int) -> torch.Tensor:
        """AuxK's code, dense [batch, d_sae]: each row's k_aux largest pre-activations of dead
        latents, zeros elsewhere (a: the relu'd pre-activations, differentiable; dead: the mask,
        n_dead: at most how many it marks). The entries are chosen without autograd and kept by a
        mask, so the backward is one multiply."""
        with torch.no_grad():
            idx = (
                torch.where(dead, a, 0)
                .topk(min(self.cfg.k_aux, n_dead), dim=-1, sorted=False)
                .indices
            )
            keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True).logical_and_(dead)
        return a * keep
