"""BatchTopK (Bussmann, Leask, Nanda 2024): in training the batch's top batch*k pre-activations
survive, so each token gets as many latents as it needs and the batch averages k; at inference one
global threshold θ, an estimate of training's cut (saekit.sae.theta), decides each token on its
own."""

from __future__ import annotations

import torch

from ... import distributed as D
from .. import theta as T
from ..base import SAE, TrainOutput
from ..config import SAEConfig, SAEConfigError, register
from ..outputs import Selection
from ..selections import above, batch_topk
from ..step import PLAIN, Step


@register
class BatchTopKSAE(SAE):
    """Top batch*k pre-activations of the whole batch in training; a global threshold θ at
    inference."""

    arch, label, color = "batchtopk", "BatchTopK", "#d62728"
    # SAELens saves BatchTopK as a JumpReLU
    saelens_name, saelens_training_name = "jumprelu", "batchtopk"
    has_k = has_theta = uses_auxk = graph_safe = True
    fast_path = "top"
    modes = ("threshold", "batch")

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))  # θ
        # cuts θ has taken
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    @property
    def has_threshold(self) -> bool:
        """Whether θ has been set (by training, calibration or a file)."""
        return int(self.threshold_updates) > 0

    def select(self, a, mode=None, step: Step = PLAIN) -> Selection:
        """Threshold mode: every entry above θ. Batch and train modes: the batch's top batch*k
        positive entries."""
        mode = mode or ("batch" if self.training else "threshold")
        if mode == "threshold":
            if not self.has_threshold:
                raise SAEConfigError(
                    "this BatchTopK SAE has no inference threshold yet (it was never trained); "
                    "use encode(x, mode='batch') or train it first"
                )
            return above(a, self.threshold)
        if mode not in ("batch", "train"):
            raise SAEConfigError(f"unknown BatchTopK mode '{mode}'; use 'threshold' or 'batch'")
        # θ estimates the cut: the search looks above it first
        theta = float(self.threshold) if mode == "batch" and self.has_threshold else 0.0
        return batch_topk(a, self.cfg.k, theta, step.distributed)

    def train_code(self, a, step: Step = PLAIN):
        """The reference path's code: a kept at the batch's top entries (found in any order: a
        mask needs none)."""
        sel = batch_topk(a, self.cfg.k, distributed=step.distributed, row_major=False)
        return self._masked(a, sel), sel.cut

    @torch.no_grad()
    def after_step(self, out: TrainOutput) -> dict:
        """θ takes the step's cut into its running mean."""
        if out.cut is not None:
            T.running_update(
                self.threshold, self.threshold_updates, out.cut, self.cfg.threshold_beta
            )
        return {"theta": self.threshold.clone()}

    def inference_threshold(self):
        return self.threshold.detach()

    @torch.no_grad()
    def set_threshold(self, theta: float, info: dict | None = None) -> None:
        """Set θ (from a calibration or a file) and record where it came from."""
        self.threshold.fill_(float(theta))
        self.threshold_updates.clamp_(min=1)
        if info is not None:
            self.theta_info = info

    def load_threshold(self, threshold):
        # float64: d_sae equal values give that value exactly
        self.set_threshold(float(threshold.double().mean()))

    @torch.no_grad()
    def first_latents(self, w: int) -> BatchTopKSAE:
        """A BatchTopK SAE of this one's first w latents (same weights, same θ), in eval mode."""
        fields = {
            **self.cfg.to_dict(),
            "arch": "batchtopk",
            "d_sae": w,
            "k": min(self.cfg.k, w - 1),
            "group_sizes": None,
            "group_weights": None,
        }
        sub = BatchTopKSAE(SAEConfig.from_dict(fields)).to(self.W_enc.device)
        for mine, theirs in (
            (sub.W_enc, self.W_enc[:, :w]),
            (sub.W_dec, self.W_dec[:w]),
            (sub.b_enc, self.b_enc[:w]),
        ):
            mine.copy_(theirs)
        for name in ("b_dec", "input_scale", "threshold", "threshold_updates"):
            getattr(sub, name).copy_(getattr(self, name))
        return sub.eval()

    @torch.no_grad()
    def calibrate_threshold(self, batches, over_ranks: bool = False) -> float:
        """Set θ to the mean over `batches` of the batch's cut with the final weights (the running
        mean lags behind weights that were still moving). over_ranks: the mean of every rank's
        estimate (torch.distributed)."""
        final, n = T.estimate(self, batches, self.cfg.k)
        if final is not None:
            running = float(self.threshold) if self.has_threshold else None
            final = (
                float(D.mean_over_ranks(self.threshold.new_tensor(final))) if over_ranks else final
            )
            self.threshold_updates += n
            self.set_threshold(
                final,
                {
                    "source": "training",
                    "running_estimate": running,
                    "final_estimate": final,
                    "final_estimate_batches": n,
                    "how": "mean over batches of the smallest activation BatchTopK keeps; the "
                    "running estimate during "
                    "training, the final one with the final weights (used)",
                },
            )
        return float(self.threshold)
