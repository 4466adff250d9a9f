"""Input scaling, the part of the SAE base that maps activations into the space the SAE works in and
back: per token (centre, unit std; the paper's code), one dataset-wide scale, or none
(`SAEConfig.normalize`). `InputScaling` is mixed into `saekit.sae.base.SAE`."""

from __future__ import annotations

import torch


class InputScaling:
    """Mixed into SAE: uses its cfg (normalize) and the buffer input_scale."""

    def normalize_input(self, x: torch.Tensor):
        """x in input space -> (x in SAE space, context to undo it)."""
        if self.cfg.normalize == "token":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            # the unbiased std (what x.std gives, more slowly) as the centred
            # values' norm / sqrt(d - 1)
            std = torch.linalg.vector_norm(xc, dim=-1, keepdim=True).mul_(
                max(x.shape[-1] - 1, 1) ** -0.5
            )
            return xc / (std + 1e-5), (mu, std)
        if self.cfg.normalize == "dataset":
            return x * self.input_scale, None
        return x, None

    def denormalize(self, x_hat: torch.Tensor, ctx) -> torch.Tensor:
        if self.cfg.normalize == "token":
            mu, std = ctx
            return x_hat * (std + 1e-5) + mu
        if self.cfg.normalize == "dataset":
            return x_hat / self.input_scale
        return x_hat

    def renormalize(self, y: torch.Tensor, ctx) -> torch.Tensor:
        """Input-space y (e.g. x_hat) into the SAE's space with x's context: the inverse of
        denormalize."""
        if self.cfg.normalize == "token":
            mu, std = ctx
            return (y - mu) / (std + 1e-5)
        if self.cfg.normalize == "dataset":
            return y * self.input_scale
        return y
