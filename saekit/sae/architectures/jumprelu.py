"""JumpReLU (Rajamanoharan et al. 2024): each latent fires above its own learned threshold θ_i; the
L0 penalty and the thresholds' gradients come through straight-through pseudo-derivatives (a
rectangle kernel of width `jumprelu_bandwidth`)."""

from __future__ import annotations

import math

import torch

from ... import distributed as D
from ..base import SAE
from ..config import SAEConfig, register
from ..outputs import Selection
from ..selections import above
from ..step import PLAIN, Step


def rectangle(a: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The rectangle kernel's window, |a - theta| < bandwidth / 2 (theta per latent, broadcast over
    rows), as a bool
    mask: two compares against the window's bounds, no float temporaries of a's size."""
    half = bandwidth / 2
    return (a > theta - half) & (a < theta + half)


class JumpReLUFunction(torch.autograd.Function):
    """z = a * H(a - theta); gradient to theta through a rectangle kernel of width `bandwidth`."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return a * (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_a = g * (a > theta).to(a.dtype)
        grad_theta = (-(theta / bw) * rectangle(a, theta, bw).to(g.dtype) * g).sum(0)
        return grad_a, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(a - theta), with the pseudo-derivative to theta only (the JumpReLU paper's L0
    estimator)."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = (-(1.0 / bw) * rectangle(a, theta, bw).to(g.dtype) * g).sum(0)
        return torch.zeros_like(a), grad_theta, None


@register
class JumpReLUSAE(SAE):
    """Per-latent learned threshold (log-parametrised); L0 penalty through a straight-through
    estimator."""

    arch, label, color = "jumprelu", "JumpReLU", "#2ca02c"
    saelens_name = saelens_training_name = "jumprelu"
    graph_safe = True
    fast_path = "jumprelu"

    @classmethod
    def sparsity_settings(cls, cfg):
        return {"target_l0": cfg.target_l0} if cfg.target_l0 else {"l0_coeff": cfg.l0_coeff}

    @classmethod
    def sweep_setting(cls, level):
        # k only names the level in sweep tables
        return {"target_l0": float(level), "k": int(level)}

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(
            torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold))
        )

    def activate(self, a, mode=None):
        return JumpReLUFunction.apply(a, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)

    def train_code(self, a, step: Step = PLAIN):
        return self.activate(a), None

    def select(self, a, mode=None, step: Step = PLAIN) -> Selection:
        return above(a, self.log_threshold.exp())

    def sparsity_loss(self, a, z, step: Step = PLAIN):
        l0 = (
            StepFunction.apply(a, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)
            .sum(-1)
            .mean()
        )
        return self.l0_penalty(l0, step)

    def l0_penalty(self, l0: torch.Tensor, step: Step = PLAIN) -> torch.Tensor:
        """The sparsity term for a batch's mean L0 (differentiable through the step's
        pseudo-derivative)."""
        c, target = self.cfg.l0_coeff, self.cfg.target_l0
        if not target:
            return c * l0 / self.cfg.d_in
        # the penalty of the global batch's L0 (not the mean of per-rank penalties)
        if step.distributed:
            lg = D.mean_over_ranks(l0.detach())
            # value P(L_global); DDP's mean of the ranks' gradients is P'(L_global) * mean dL_rank
            return c * (
                (lg / target - 1).pow(2) + 2 * (lg / target - 1) / target * (l0 - l0.detach())
            )
        return c * (l0 / target - 1).pow(2)

    def inference_threshold(self):
        return self.log_threshold.exp().detach()

    @torch.no_grad()
    def load_threshold(self, threshold):
        self.log_threshold.data = threshold.clamp_min(1e-12).log().to(self.log_threshold)

    def optim_groups(self) -> list[dict]:
        rest = [p for n, p in self.named_parameters() if n != "log_threshold"]
        return [
            {"params": rest, "lr_scale": 1.0},
            {"params": [self.log_threshold], "lr_scale": self.cfg.threshold_lr_scale},
        ]

    @torch.no_grad()
    def init_from_data(self, xs: torch.Tensor) -> None:
        """With a target L0, start every threshold at the sample's global (target_l0 * n)-th largest
        pre-activation, the value that gives that L0 on it: the log-threshold moves about lr per
        Adam step, so from a fixed 0.01 a few hundred steps never reach the ~2 (in
        per-token-normalised units) that an L0 of 16-64 of 4,608 needs."""
        if not self.cfg.target_l0:
            return
        xs = xs[:4096]
        a = self.pre_acts(xs).flatten()
        n = max(1, min(a.numel(), int(round(self.cfg.target_l0 * xs.shape[0]))))
        theta = a.topk(n, sorted=False).values.min().clamp_min(1e-4)
        self.log_threshold.fill_(math.log(float(theta)))
