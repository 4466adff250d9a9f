"""TopK (Gao et al. 2024): the k largest pre-activations of each token survive."""

from __future__ import annotations

from ..base import SAE
from ..config import register
from ..outputs import Selection
from ..selections import topk
from ..step import PLAIN, Step


@register
class TopKSAE(SAE):
    """The k largest pre-activations of each token."""

    arch, label, color = "topk", "TopK", "#1f77b4"
    saelens_name = saelens_training_name = "topk"
    has_k = per_token_k = uses_auxk = graph_safe = True
    fast_path = "top"

    def select(self, a, mode=None, step: Step = PLAIN) -> Selection:
        return topk(a, self.cfg.k)
