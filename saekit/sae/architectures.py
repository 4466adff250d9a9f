"""The architectures: BatchTopK (with its inference threshold theta), Matryoshka BatchTopK, TopK, JumpReLU and
ReLU-L1. Each is one class that states its facts (name, SAELens names, whether it has k or theta, ...) and is
registered by name; adding an architecture is one class here plus its tests."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .. import distributed as D
from .base import SAE, TrainOutput
from .config import ARCHITECTURES, SAEConfig, SAEConfigError, architecture, register, resolve_group_sizes
from .kernels import (CodeIndex, JumpReLUFunction, Selection, SparseCode, StepFunction, ThresholdPseudoGrad, batch_topk,
                      batch_topk_static, flat_selection, rectangle, row_topk, sparse_decode, sparse_encode,
                      sparse_stats)


@register
class BatchTopKSAE(SAE):
    """Top B*k pre-activations of the whole batch in training; a global threshold theta at inference."""

    arch, label, color = "batchtopk", "BatchTopK", "#d62728"
    saelens_name, saelens_training_name = "jumprelu", "batchtopk"  # SAELens saves BatchTopK as a JumpReLU
    has_k = has_theta = uses_auxk = has_fast_path = graph_safe = True
    modes = ("threshold", "batch")
    # the top B*k is first looked for above a hint (batch_topk, batch_topk_static): this fraction of the previous
    # training batch's cut (of theta in batch mode). Theta, a running mean, lags behind: in a 300-step SmolLM2 run
    # fewer than B*k entries passed 0.9 theta at 195 of 299 steps, 0.9x the previous cut 1.31-2.00 B*k at every
    # step (benchmarks/results/selection_hint_cpu.txt)
    candidate_factor, candidate_capacity = 0.9, 3  # the latter: batch_topk_static keeps up to 3 B*k candidates

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        # the previous training step's cut, the next selection's hint (after_step writes it from the trainer's
        # read-back; not saved): a number, which a GPU compares in a faster kernel than a 0-dim device tensor,
        # except in a step recorded once and replayed (saekit.train.graphs), which updates it as one on the device
        self.previous_cut: float | torch.Tensor | None = None

    @property
    def has_threshold(self) -> bool:
        """Whether theta has been set (by training, calibration or a file)."""
        return int(self.threshold_updates) > 0

    def select(self, a, mode=None) -> Selection:
        mode = mode or ("batch" if self.training else "threshold")
        if mode == "threshold":
            if not self.has_threshold:
                raise SAEConfigError("this BatchTopK SAE has no inference threshold yet (it was never trained); "
                                     "use encode(x, mode='batch') or train it first")
            return Selection(*(a > self.threshold).nonzero(as_tuple=True))
        flat, cut = self._top_entries(a, mode)
        return flat_selection(flat, a.shape[1], a.numel(), cut)

    def _top_entries(self, a, mode="train") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's top B*k positive entries of a (mode "batch" or "train"): their flat indices and cut."""
        if mode not in ("batch", "train"):
            raise SAEConfigError(f"unknown BatchTopK mode '{mode}'; use 'threshold' or 'batch'")
        # theta read back to the host where the previous cut is not known; 0 until set: no hint
        known = mode == "train" and self.previous_cut is not None
        hint = (self.previous_cut if known else float(self.threshold)) * self.candidate_factor
        if mode == "train" and self.distributed:  # over the global batch of every rank
            flat, vals, cut = D.global_batch_topk(a, self.cfg.k, hint, batch_topk)
            return flat, cut
        vals, flat = batch_topk(a, min(a.shape[0] * self.cfg.k, a.numel()), hint, positive=True)
        return flat, vals.min().detach() if vals.numel() else None

    def train_code(self, a):
        """The reference path's code: a masked to the batch's top entries, found by flat index (unsorted)."""
        flat, cut = self._top_entries(a)
        keep = torch.zeros(a.numel(), dtype=torch.bool, device=a.device).index_fill_(0, flat, True)
        return a * keep.view_as(a), cut

    def train_select(self, a) -> Selection:
        """The training selection without a read-back (batch_topk_static, hint from the previous step's cut),
        flagged by Selection.exact; the exact select(a, "train") where there is no previous cut yet, under
        torch.distributed (the global cut is agreed between ranks on the host), with sync_free off (None: on the
        CPU) or in a step redone because its selection was not exact (redo_exact)."""
        if self.previous_cut is None or not self._select_without_read_backs(a):
            return self.select(a, "train")
        n = min(a.shape[0] * self.cfg.k, a.numel())
        vals, flat, exact = batch_topk_static(a, n, self.previous_cut * self.candidate_factor,
                                              min(self.candidate_capacity * n, a.numel()))
        return flat_selection(flat, a.shape[1], a.numel(), vals.min(), exact)

    @torch.no_grad()
    def after_step(self, out: TrainOutput) -> dict:
        """theta: a running mean of the training cuts; the cut as a number (trainer's read-back) for the next hint."""
        if out.cut is not None:
            self.previous_cut = out.cut_value if out.cut_value is not None else float(out.cut)
            self.update_theta(out.cut, self.previous_cut if self.reads_back_freely else None)
        return {"theta": self.threshold.clone()}

    @torch.no_grad()
    def update_theta(self, cut: torch.Tensor, value: float | None = None) -> None:
        """theta takes a training selection's cut: theta += w (cut - theta), w = max(1 - threshold_beta, 1/n) at the
        n-th cut (the mean of the first cuts, then an EMA). On the device in four kernels; with the cut's `value`
        known on the host where a read-back is free (SAE.reads_back_freely), in host arithmetic (one fill, ~20 us less)."""
        n, theta = self.threshold_updates.add_(1), self.threshold
        if value is None:
            theta.lerp_(cut.to(theta.dtype), n.reciprocal().clamp_(min=1 - self.cfg.threshold_beta).to(theta.dtype))
        else:
            theta.fill_(float(theta) + max(1 / int(n), 1 - self.cfg.threshold_beta) * (value - float(theta)))

    def inference_threshold(self):
        return self.threshold.detach()

    @torch.no_grad()
    def set_threshold(self, theta: float, info: dict | None = None) -> None:
        """Set theta (from a calibration or a file) and record where it came from."""
        self.threshold.fill_(float(theta))
        self.threshold_updates.clamp_(min=1)
        if info is not None:
            self.theta_info = info

    def load_threshold(self, threshold):
        self.set_threshold(float(threshold.double().mean()))  # float64: d_sae equal values give that value exactly

    @torch.no_grad()
    def first_latents(self, w: int) -> "BatchTopKSAE":
        """A BatchTopK SAE of this one's first w latents (same weights, same theta), in eval mode."""
        cfg = SAEConfig.from_dict({**self.cfg.to_dict(), "arch": "batchtopk", "d_sae": w, "k": min(self.cfg.k, w - 1),
                                   "group_sizes": None, "group_weights": None})
        sub = BatchTopKSAE(cfg).to(self.W_enc.device)
        for mine, theirs in ((sub.W_enc, self.W_enc[:, :w]), (sub.W_dec, self.W_dec[:w]), (sub.b_enc, self.b_enc[:w])):
            mine.copy_(theirs)
        for name in ("b_dec", "input_scale", "threshold", "threshold_updates"):
            getattr(sub, name).copy_(getattr(self, name))
        return sub.eval()

    @torch.no_grad()
    def calibrate_threshold(self, batches) -> float:
        """Set theta to the mean over `batches` of the smallest activation BatchTopK keeps, using the
        final weights (the training-time running mean lags behind weights that were still moving).
        Under torch.distributed, the mean of every rank's estimate."""
        cuts = []
        for x in batches:
            xs, _ = self.normalize_input(self._check_input(x.to(self.W_enc.device)))
            a = self.pre_acts(xs)
            vals = batch_topk(a, min(a.shape[0] * self.cfg.k, a.numel()), positive=True)[0]
            if vals.numel():
                cuts.append(vals.min())
        if cuts:
            running = float(self.threshold) if self.has_threshold else None
            final = D.mean_over_ranks(torch.stack(cuts).mean()) if self.distributed else torch.stack(cuts).mean()
            self.threshold_updates += len(cuts)
            self.set_threshold(float(final), {
                "source": "training", "running_estimate": running, "final_estimate": float(final),
                "final_estimate_batches": len(cuts),
                "how": "mean over batches of the smallest activation BatchTopK keeps; the running estimate during "
                       "training, the final one with the final weights (used)"})
        return float(self.threshold)


@register
class TopKSAE(SAE):
    """The k largest pre-activations of each token."""

    arch, label, color = "topk", "TopK", "#1f77b4"
    saelens_name = saelens_training_name = "topk"
    has_k = per_token_k = uses_auxk = has_fast_path = graph_safe = True

    def select(self, a, mode=None) -> Selection:
        return row_topk(a, self.cfg.k)

    def train_select(self, a) -> Selection:
        """Each row's k largest without a read-back: all k of every row, flagged exact when all are positive (the
        exact selection drops the others, a mask whose size the host would wait for); the exact select off
        sync_free."""
        return row_topk(a, self.cfg.k, static=self._select_without_read_backs(a))


@register
class JumpReLUSAE(SAE):
    """Per-latent learned threshold (log-parametrised); L0 penalty through a straight-through estimator."""

    arch, label, color = "jumprelu", "JumpReLU", "#2ca02c"
    saelens_name = saelens_training_name = "jumprelu"
    has_fast_path = graph_safe = thresholded = True

    @classmethod
    def sparsity_settings(cls, cfg):
        return {"target_l0": cfg.target_l0} if cfg.target_l0 else {"l0_coeff": cfg.l0_coeff}

    @classmethod
    def sweep_setting(cls, level):
        return {"target_l0": float(level), "k": int(level)}  # k only names the level in sweep tables

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    def activate(self, a, mode=None):
        return JumpReLUFunction.apply(a, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)

    def train_code(self, a):
        return self.activate(a), None

    def select(self, a, mode=None) -> Selection:
        return Selection(*(a > self.log_threshold.exp()).nonzero(as_tuple=True))

    def sparsity_loss(self, a, z):
        return self.l0_penalty(StepFunction.apply(a, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth).sum(-1).mean())

    def fast_loss(self, x: torch.Tensor) -> TrainOutput:
        """The reference loss through the sparse encoder and decoder. One scan finds the entries above the window's
        lower bound, a > theta - bandwidth / 2, which hold the code (a > theta) and the rectangle window
        (|a - theta| < bandwidth / 2); their values say which is which. The code's entries are differentiated and
        decoded sparsely, and the thresholds get their pseudo-derivatives from the window's entries
        (ThresholdPseudoGrad): exact when both sets are small, which they are once theta has moved off zero (with a
        target L0 from the first step, see init_from_data). One index serves the encoder and the decoder. Without
        read-backs (`train_entries`) where the previous step's density gives the number of slots."""
        xs, _ = self.normalize_input(self._check_input(x))
        bw, batch = self.cfg.jumprelu_bandwidth, xs.shape[0]
        theta0 = self.log_threshold.detach().exp()
        if not self.probe_pays(xs, lambda a: (a > theta0 - bw / 2).sum()):
            return self.reference_loss(x)
        xc, a = self.centred_pre_acts(xs)
        with torch.no_grad():
            e = self.train_entries(a, theta0 - bw / 2)
            v, t = a[e.rows, e.cols], theta0[e.cols]
            on, window = v > t, rectangle(v, t, bw)  # the same compares as a > theta and rectangle(a, theta)
            if e.valid is not None:
                on, window = on & e.valid, window & e.valid
        if e.valid is None and not self.sparse_pays(e.rows.numel(), batch):
            return self.reference_loss(x)
        theta = self.log_threshold.exp()
        index = CodeIndex(e.rows, e.cols, batch, self.cfg.d_sae, rows_sorted=True)
        vals = sparse_encode(xs, self.W_enc, self.b_enc, self.b_dec, index, a, xc).vals * on  # the window's: 0
        zeros = ThresholdPseudoGrad.apply(theta, e.cols, bw, True, window)  # carry dL/dz of the window to theta
        code = SparseCode(e.rows, e.cols, vals + zeros.to(vals.dtype), (batch, self.cfg.d_sae), index)
        x_hat = sparse_decode(code, self.W_dec) + self.b_dec
        l0 = on.sum() / batch + ThresholdPseudoGrad.apply(theta, e.cols, bw, False, window).sum() / batch
        return self._finish(xs, x_hat, self.recon_loss(xs, x_hat, code), self.l0_penalty(l0), None,
                            *sparse_stats(e.rows, e.cols, batch, self.cfg.d_sae, on), None, "sparse", e.exact, e.count)

    def l0_penalty(self, l0: torch.Tensor) -> torch.Tensor:
        """The sparsity term for a batch's mean L0 (differentiable through the step's pseudo-derivative)."""
        c, target = self.cfg.l0_coeff, self.cfg.target_l0
        if not target:
            return c * l0 / self.cfg.d_in
        if self.distributed:  # the penalty of the global batch's L0 (not the mean of per-rank penalties)
            lg = D.mean_over_ranks(l0.detach())
            # value P(L_global); DDP's mean of the ranks' gradients is P'(L_global) * mean dL_rank
            return c * ((lg / target - 1).pow(2) + 2 * (lg / target - 1) / target * (l0 - l0.detach()))
        return c * (l0 / target - 1).pow(2)

    def inference_threshold(self):
        return self.log_threshold.exp().detach()

    @torch.no_grad()
    def load_threshold(self, threshold):
        self.log_threshold.data = threshold.clamp_min(1e-12).log().to(self.log_threshold)

    def optim_groups(self) -> list[dict]:
        rest = [p for n, p in self.named_parameters() if n != "log_threshold"]
        return [{"params": rest, "lr_scale": 1.0},
                {"params": [self.log_threshold], "lr_scale": self.cfg.threshold_lr_scale}]

    @torch.no_grad()
    def init_from_data(self, xs: torch.Tensor) -> None:
        """With a target L0, start every threshold at the sample's global (target_l0 * n)-th largest pre-activation,
        the value that gives that L0 on it: the log-threshold moves about lr per Adam step, so from a fixed 0.01 a few
        hundred steps never reach the ~2 (in per-token-normalised units) that an L0 of 16-64 of 4,608 needs."""
        if not self.cfg.target_l0:
            return
        xs = xs[:4096]
        a = self.pre_acts(xs).flatten()
        n = max(1, min(a.numel(), int(round(self.cfg.target_l0 * xs.shape[0]))))
        theta = a.topk(n, sorted=False).values.min().clamp_min(1e-4)
        self.log_threshold.fill_(math.log(float(theta)))


@register
class ReLUSAE(SAE):
    """Plain ReLU code with an L1 penalty weighted by decoder row norms."""

    arch, label, color = "relu", "ReLU-L1", "#9467bd"
    saelens_name = saelens_training_name = "standard"
    has_fast_path = graph_safe = thresholded = True
    sweep_knob = "l1_coeff"

    @classmethod
    def sparsity_settings(cls, cfg):
        return {"l1_coeff": cfg.l1_coeff}

    @classmethod
    def sweep_setting(cls, level):
        return {"l1_coeff": float(level)}

    def activate(self, a, mode=None):
        return a

    def train_code(self, a):
        return a, None

    def select(self, a, mode=None) -> Selection:
        return Selection(*(a > 0).nonzero(as_tuple=True))

    def sparsity_loss(self, a, z):
        return self.cfg.l1_coeff * (z * self.W_dec.norm(dim=-1)).sum(-1).mean() / self.cfg.d_in

    def fast_loss(self, x: torch.Tensor) -> TrainOutput:
        """The reference loss through the sparse encoder and decoder over the positive pre-activations, with the L1
        term on those entries alone; the reference path while the code is too dense for that to pay."""
        xs, _ = self.normalize_input(self._check_input(x))
        if not self.probe_pays(xs, lambda a: (a > 0).sum()):
            return self.reference_loss(x)
        xc, a = self.centred_pre_acts(xs)
        with torch.no_grad():
            e = self.train_entries(a, 0)  # without read-backs where the previous density gives the slots
        if e.valid is None and not self.sparse_pays(e.rows.numel(), xs.shape[0]):
            return self.reference_loss(x)
        code = sparse_encode(xs, self.W_enc, self.b_enc, self.b_dec,
                             CodeIndex(e.rows, e.cols, xs.shape[0], self.cfg.d_sae, rows_sorted=True), a, xc)
        if e.valid is not None:
            code = code._replace(vals=code.vals * e.valid)  # slots without an entry: 0, and no gradient
        x_hat = sparse_decode(code, self.W_dec) + self.b_dec
        l1 = (code.vals * self.W_dec.norm(dim=-1)[e.cols]).sum() / xs.shape[0]
        return self._finish(xs, x_hat, self.recon_loss(xs, x_hat, code), self.cfg.l1_coeff * l1 / self.cfg.d_in, None,
                            *sparse_stats(e.rows, e.cols, xs.shape[0], self.cfg.d_sae, e.valid), None, "sparse", e.exact,
                            e.count)


@register
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025): BatchTopK over the whole
    dictionary, and every nested prefix of latent groups must reconstruct the input on its own.

    The reconstruction term is the weighted mean of the prefixes' MSEs (SAELens sums them: the same
    up to a constant factor that Adam mostly absorbs). The fast path decodes every group's part of the one sparse
    code at once (its entries indexed by group and row: fixed shapes, no read-back), and the prefixes and the whole
    reconstruction are their running sums. Inference as BatchTopK: one threshold theta.
    """

    arch, label, color = "matryoshka", "Matryoshka BatchTopK", "#ff7f0e"
    saelens_training_name = "matryoshka_batchtopk"
    has_prefixes = True

    @classmethod
    def check_config(cls, cfg):
        cfg.group_sizes = resolve_group_sizes(cfg.group_sizes, cfg.d_sae)
        if cfg.group_weights is not None and len(cfg.group_weights) != len(cfg.group_sizes):
            raise SAEConfigError(f"group_weights has {len(cfg.group_weights)} entries but there are "
                                 f"{len(cfg.group_sizes)} groups; give one weight per group")

    @property
    def widths(self) -> list[int]:
        """Cumulative prefix sizes, e.g. [288, 576, 1152, 2304, 4608]."""
        return list(itertools.accumulate(self.cfg.group_sizes))

    def _weights(self) -> list[float]:
        w = [float(v) for v in self.cfg.group_weights or [1.0] * len(self.cfg.group_sizes)]
        return [v / sum(w) for v in w]

    def group_of(self, latents: torch.Tensor) -> torch.Tensor:
        """Group index of each latent index."""
        return torch.bucketize(latents, torch.tensor(self.widths, device=latents.device), right=True)

    def sparse_reconstruction(self, code: SparseCode) -> tuple[torch.Tensor, CodeIndex, list[torch.Tensor]]:
        """Every group's part of the code decoded at once (entries as rows group * batch + row: fixed shapes), and
        b_dec plus their running sums, one add each (a cumsum measured slower): the prefixes', the last x_hat."""
        widths, batch = self.widths, code.shape[0]
        index = CodeIndex(sum((code.cols >= w).long() for w in widths[:-1]) * batch + code.rows, code.cols,
                          len(widths) * batch, self.cfg.d_sae)
        parts = sparse_decode(code._replace(index=index), self.W_dec).chunk(len(widths))
        sums = list(itertools.accumulate(parts, initial=self.b_dec))[1:]
        return sums[-1], index, sums

    def recon_loss(self, xs, x_hat, code):  # code: the dense z, or the fast path's prefixes (sparse_reconstruction)
        if not isinstance(code, list):  # every group but the last (x_hat is the whole dictionary's)
            parts = (code[:, lo:hi] @ self.W_dec[lo:hi] for lo, hi in zip([0, *self.widths], self.widths[:-1]))
            code = list(itertools.accumulate(parts, initial=self.b_dec))[1:] + [x_hat]
        losses = [F.mse_loss(p, xs) for p in code[:-1]] + [F.mse_loss(x_hat, xs)]
        return sum(w * l for w, l in zip(self._weights(), losses))

    def prefix(self, n_groups: int) -> BatchTopKSAE:
        """A BatchTopK SAE made of the first n_groups groups (same weights, same theta). In threshold
        mode its code is exactly this SAE's code restricted to those latents, so every metric (NMSE,
        CE recovered) of a prefix is the metric of this object."""
        if not 1 <= n_groups <= len(self.cfg.group_sizes):
            raise SAEConfigError(f"n_groups must be in 1..{len(self.cfg.group_sizes)} (got {n_groups})")
        return self.first_latents(self.widths[n_groups - 1])

    def prefixes(self) -> list[BatchTopKSAE]:
        """Every nested prefix as its own SAE, smallest first (the last is the whole dictionary)."""
        return [self.prefix(g) for g in range(1, len(self.cfg.group_sizes) + 1)]


ARCHS = tuple(ARCHITECTURES)


def make_sae(cfg: SAEConfig | None = None, **kwargs) -> SAE:
    """Build an SAE from a config (or keyword fields of one)."""
    cfg = cfg or SAEConfig(**kwargs)
    return architecture(cfg.arch)(cfg)
