"""ReLU-L1 (the standard SAE of Bricken et al. 2023): every positive pre-activation survives, and an
L1 penalty, weighted by the decoder rows' norms, makes the code sparse."""

from __future__ import annotations

from ..base import SAE
from ..config import register
from ..outputs import Selection
from ..selections import above
from ..step import PLAIN, Step


@register
class ReLUSAE(SAE):
    """Plain ReLU code with an L1 penalty weighted by decoder row norms."""

    arch, label, color = "relu", "ReLU-L1", "#9467bd"
    saelens_name = saelens_training_name = "standard"
    graph_safe = True
    fast_path = "relu"
    sweep_knob = "l1_coeff"

    @classmethod
    def sparsity_settings(cls, cfg):
        return {"l1_coeff": cfg.l1_coeff}

    @classmethod
    def sweep_setting(cls, level):
        return {"l1_coeff": float(level)}

    def activate(self, a, mode=None):
        return a

    def train_code(self, a, step: Step = PLAIN):
        return a, None

    def select(self, a, mode=None, step: Step = PLAIN) -> Selection:
        return above(a, 0)

    def sparsity_loss(self, a, z, step: Step = PLAIN):
        return self.cfg.l1_coeff * (z * self.W_dec.norm(dim=-1)).sum(-1).mean() / self.cfg.d_in
