"""The SAE family on one base: BatchTopK (with an inference threshold), TopK, JumpReLU and ReLU-L1.

All share the encoder `a = relu((x - b_dec) W_enc + b_enc)` and the decoder `x_hat = z W_dec + b_dec`;
they differ only in `select` (which pre-activations survive) and in their sparsity loss term.
Files follow SAELens: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc, b_dec, and `threshold` for JumpReLU-style inference).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from . import __version__

ARCHS = ("batchtopk", "topk", "jumprelu", "relu", "matryoshka")
NORMALIZATIONS = ("none", "token", "dataset")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


class SAEConfigError(ValueError):
    """An SAE configuration or file that cannot be used."""


@dataclass
class SAEConfig:
    """What defines an SAE. Serialises into SAELens's cfg.json (our own fields under "saekit")."""
    arch: str = "batchtopk"
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32  # batchtopk/topk: latents per token (batchtopk: on average over the batch)
    normalize: str = "token"  # token: centre + unit std per token (the paper's code; SAELens "layer_norm") | dataset | none
    # AuxK (batchtopk/topk): the k_aux largest dead pre-activations reconstruct the residual
    k_aux: int = 512
    aux_alpha: float = 1 / 32
    dead_tokens: int = 5 * 4096  # a latent is dead after this many tokens without firing (~5 batches)
    # starting norm of each encoder column (W_enc starts as the unit-norm decoder transposed, times this):
    # "paper" = sqrt(2 d_in / d_sae), the norm the paper's code draws (kaiming_uniform_ on a [d_in, d_sae]
    # W_enc; 0.5 at 8x); 1 = the decoder transposed; sparsify starts at sqrt(1/3) ~0.58 (nn.Linear's).
    # "paper" gave 7-22% lower NMSE than 1 on the embedded model (benchmarks/results/enc_init_cpu.txt)
    enc_init_norm: float | str = "paper"
    threshold_beta: float = 0.99  # batchtopk: EMA of the smallest kept activation per batch -> theta
    # JumpReLU: learned per-latent threshold, STE with a rectangle kernel, L0 penalty
    threshold_lr_scale: float = 10.0  # JumpReLU: the log-threshold's learning rate / the run's
    jumprelu_init_threshold: float = 0.01  # SAELens's defaults; the paper's 0.001 needs far longer runs
    jumprelu_bandwidth: float = 0.05
    l0_coeff: float = 1.0  # weight of the L0 penalty (or of the target-L0 penalty below)
    target_l0: float | None = None  # if set, penalty = l0_coeff * (L0/target - 1)^2
    # ReLU: L1 penalty on activations weighted by decoder row norms
    l1_coeff: float = 5.0
    # Matryoshka BatchTopK: nested groups of latents; each prefix of groups must reconstruct on its own.
    # group_sizes: latents per group (ints summing to d_sae) or fractions of d_sae (summing to 1);
    # None = prefixes of 1/16, 1/8, 1/4, 1/2 and all of the dictionary.
    group_sizes: list | None = None
    group_weights: list | None = None  # loss weight of each prefix (default equal); normalised to sum 1
    # provenance
    hook_name: str | None = None
    model_name: str | None = None
    context_size: int | None = None
    dataset: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise SAEConfigError(f"unknown architecture '{self.arch}'; choose one of {', '.join(ARCHS)}")
        if self.normalize not in NORMALIZATIONS:
            raise SAEConfigError(f"unknown normalize '{self.normalize}'; choose one of {', '.join(NORMALIZATIONS)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEConfigError(f"d_in and d_sae must be positive (got d_in={self.d_in}, d_sae={self.d_sae})")
        if self.enc_init_norm != "paper" and not (
                isinstance(self.enc_init_norm, (int, float)) and not isinstance(self.enc_init_norm, bool)
                and self.enc_init_norm > 0):
            raise SAEConfigError(f"enc_init_norm must be a positive number or 'paper' (got {self.enc_init_norm!r})")
        if self.arch == "matryoshka":
            self.group_sizes = resolve_group_sizes(self.group_sizes, self.d_sae)
            if self.group_weights is not None and len(self.group_weights) != len(self.group_sizes):
                raise SAEConfigError(f"group_weights has {len(self.group_weights)} entries but there are "
                                     f"{len(self.group_sizes)} groups; give one weight per group")
        if self.arch in ("batchtopk", "topk", "matryoshka") and not 0 < self.k < self.d_sae:
            raise SAEConfigError(f"k must satisfy 0 < k < d_sae (got k={self.k}, d_sae={self.d_sae}); "
                                 f"use a larger dictionary (expansion) or a smaller k")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def encoder_start_norm(self) -> float:
        """The norm each encoder column starts at (see enc_init_norm)."""
        if self.enc_init_norm == "paper":
            return (2 * self.d_in / self.d_sae) ** 0.5  # kaiming_uniform_ (a=0): entry variance 2 / fan_in=d_sae
        return float(self.enc_init_norm)

    @property
    def name(self) -> str:
        sparsity = {"batchtopk": f"k{self.k}", "topk": f"k{self.k}", "matryoshka": f"k{self.k}",
                    "jumprelu": f"l0{self.target_l0:g}" if self.target_l0 else f"l0c{self.l0_coeff:g}",
                    "relu": f"l1c{self.l1_coeff:g}"}[self.arch]
        return f"{self.arch}_{sparsity}_{self.d_sae}"


def resolve_group_sizes(sizes, d_sae: int) -> list[int]:
    """Matryoshka group sizes as ints summing to d_sae, from ints, fractions of d_sae, or None (default)."""
    if sizes is None:
        sizes = [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2]
    sizes = list(sizes)
    if not sizes or any(v <= 0 for v in sizes):
        raise SAEConfigError(f"group_sizes must be positive numbers (got {sizes})")
    if all(isinstance(v, int) for v in sizes):
        if sum(sizes) != d_sae:
            raise SAEConfigError(f"group_sizes {sizes} sum to {sum(sizes)}, not d_sae={d_sae}; make them sum to "
                                 f"the dictionary size (or give fractions that sum to 1)")
        return sizes
    if abs(sum(sizes) - 1) > 1e-6:
        raise SAEConfigError(f"group_sizes given as fractions {sizes} sum to {sum(sizes):g}, not 1; make them sum "
                             f"to 1 (or give integer sizes that sum to d_sae={d_sae})")
    ends = [round(d_sae * f) for f in itertools.accumulate(sizes)]
    out = [b - a for a, b in zip([0] + ends[:-1], ends)]
    if any(v <= 0 for v in out):
        raise SAEConfigError(f"group_sizes {sizes} leave an empty group at d_sae={d_sae}; use fewer or larger groups")
    return out


class SparseCode(NamedTuple):
    """Active entries of a code: rows (token), cols (latent), vals; `shape` = (batch, d_sae)."""
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, int]

    def dense(self) -> torch.Tensor:
        z = self.vals.new_zeros(self.shape)
        z[self.rows, self.cols] = self.vals
        return z


class ForwardOutput(NamedTuple):
    z: torch.Tensor  # [batch, d_sae] code
    x_hat: torch.Tensor  # [batch, d_in] reconstruction in input space


class TrainOutput(NamedTuple):
    loss: torch.Tensor
    terms: dict  # name -> scalar tensor (detached), e.g. mse, aux, sparsity
    x_hat: torch.Tensor  # [batch, d_in], in the normalised space the loss uses
    x: torch.Tensor  # [batch, d_in] normalised input
    fired: torch.Tensor  # [d_sae] bool: latents active in this batch
    l0: torch.Tensor  # [batch] active latents per token


def rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
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
        grad_theta = (-(theta / bw) * rectangle((a - theta) / bw) * g).sum(0)
        return grad_a, grad_theta, None


class _Step(torch.autograd.Function):
    """H(a - theta), with the pseudo-derivative to theta only (the JumpReLU paper's L0 estimator)."""

    @staticmethod
    def forward(ctx, a, theta, bandwidth):
        ctx.save_for_backward(a, theta)
        ctx.bandwidth = bandwidth
        return (a > theta).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = (-(1.0 / bw) * rectangle((a - theta) / bw) * g).sum(0)
        return torch.zeros_like(a), grad_theta, None


class _SparseEncode(torch.autograd.Function):
    """Encoder + selection that only differentiates the selected entries.

    Forward runs the dense encode matmul once and returns the values at `rows, cols` chosen by
    `select`; backward touches only those entries (sums of selected rows through embedding_bag),
    instead of two dense [batch, d_sae] x [d_sae, d_in] products. Gradients equal the dense path's
    exactly in math.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, select):
        xc = x - b_dec
        a = torch.relu(torch.addmm(b_enc, xc, W_enc))
        rows, cols = select(a)
        vals = a[rows, cols]
        ctx.save_for_backward(xc, W_enc, rows, cols)
        ctx.shape = a.shape
        ctx.mark_non_differentiable(rows, cols)
        return vals, rows, cols

    @staticmethod
    def backward(ctx, g, _gr, _gc):
        xc, W_enc, rows, cols = ctx.saved_tensors
        B, Fd = ctx.shape
        g = g.to(W_enc.dtype)  # under bf16 autocast the values come out in bf16; gradients stay fp32
        # the selected values are positive (relu passes them), so d vals / d a = 1. Both products are
        # sums of selected rows, done as embedding_bag (10x faster than sparse COO matmuls on CPU):
        # grad_xc[r] = sum_c g[r,c] W_enc[:, c];  grad_W_enc[:, c] = sum_r g[r,c] xc[r]
        grad_xc = _bag_sum(rows, cols, g, W_enc.t().contiguous(), B)  # [B, d_in]
        grad_W_enc = _bag_sum(cols, rows, g, xc.to(W_enc.dtype), Fd).t()  # [d_in, d_sae], latent-major
        if grad_W_enc.stride() != W_enc.stride():  # a gradient in another layout than its parameter is copied
            grad_W_enc = torch.empty_like(W_enc).copy_(grad_W_enc)  # by autograd and again by fused Adam
        grad_b_enc = torch.zeros(Fd, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        return grad_xc.to(xc.dtype), grad_W_enc, grad_b_enc, -grad_xc.sum(0), None


def _bag_sum(bags: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, table: torch.Tensor, n_bags: int) -> torch.Tensor:
    """out[b] = sum over entries e with bags[e] == b of w[e] * table[idx[e]]: [n_bags, table width]."""
    order = torch.argsort(bags, stable=True)
    offsets = torch.searchsorted(bags[order], torch.arange(n_bags, device=bags.device))
    return F.embedding_bag(idx[order], table, offsets, mode="sum", per_sample_weights=w[order].to(table.dtype),
                           include_last_offset=False)


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """z W_dec for a sparse z without building it: embedding_bag sums the selected decoder rows."""
    return _bag_sum(code.rows, code.cols, code.vals, W_dec, code.shape[0])


def batch_topk(a: torch.Tensor, n: int, hint: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest entries of a (flattened): (values, flat indices), exactly as a.flatten().topk(n).

    With hint > 0, first keep the entries above `hint` (a fraction of the running threshold) and run
    top-k among those: if at least n entries pass, the n largest are all among them, so the result is
    exact; otherwise fall back to the full top-k. Much cheaper than a top-k over all B*d_sae entries.
    """
    flat = a.reshape(-1)
    if hint > 0:
        idx = (flat > hint).nonzero().squeeze(1)
        if idx.numel() >= n:
            vals, pos = flat[idx].topk(n, sorted=False)
            return vals, idx[pos]
    return flat.topk(n, sorted=False)


class SAE(torch.nn.Module):
    """Shared base. Subclasses define `select` and `sparsity_loss`."""

    arch = "base"
    distributed = False  # set by the Trainer under torch.distributed: batch-coupled terms use the global batch

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_in, cfg.d_sae
        W_dec = torch.empty(f, d)
        torch.nn.init.kaiming_uniform_(W_dec)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)  # [d_sae, d_in], unit-norm rows
        # [d_in, d_sae], stored latent-major (strides (1, d_in)): W_enc.t() is then contiguous for the sparse
        # backward's row sums, and its gradient is made in the same layout, so neither autograd nor Adam copies
        self.W_enc = torch.nn.Parameter((W_dec * cfg.encoder_start_norm).t())
        self.b_enc = torch.nn.Parameter(torch.zeros(f))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.register_buffer("input_scale", torch.ones(()))  # dataset-wide scale (normalize="dataset")
        self.register_buffer("tokens_since_fired", torch.zeros(f, dtype=torch.long))
        # where the inference threshold came from (training's estimates or a calibration); saved in cfg.json
        self.theta_info: dict | None = None

    # -- input scaling ------------------------------------------------------------------------
    def normalize_input(self, x: torch.Tensor):
        """x in input space -> (x in SAE space, context to undo it)."""
        if self.cfg.normalize == "token":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True)
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
        """Input-space y (e.g. x_hat) into the SAE's space with x's context: the inverse of denormalize."""
        if self.cfg.normalize == "token":
            mu, std = ctx
            return (y - mu) / (std + 1e-5)
        if self.cfg.normalize == "dataset":
            return y * self.input_scale
        return y

    # -- the shared encoder/decoder -----------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """relu((x - b_dec) W_enc + b_enc) for x already normalised. [batch, d_sae]"""
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def activate(self, a: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Dense code from pre-activations (differentiable where the architecture is)."""
        rows, cols = self.select(a, mode)
        mask = torch.zeros_like(a, dtype=torch.bool)
        mask[rows, cols] = True
        return a * mask

    def select(self, a: torch.Tensor, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the active entries of pre-activations a [batch, d_sae]."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Code [batch, d_sae] for inputs [batch, d_in] (input space)."""
        xs, _ = self.normalize_input(self._check_input(x))
        return self.activate(self.pre_acts(xs), mode)

    def decode(self, z: torch.Tensor, ctx=None) -> torch.Tensor:
        """Reconstruction in input space. Pass the context from normalize_input for normalize='token'."""
        if self.cfg.normalize == "token" and ctx is None:
            raise SAEConfigError("decode() of a normalize='token' SAE needs the per-token context; use forward()")
        return self.denormalize(z @ self.W_dec + self.b_dec, ctx)

    def forward(self, x: torch.Tensor, mode: str | None = None) -> ForwardOutput:
        xs, ctx = self.normalize_input(self._check_input(x))
        z = self.activate(self.pre_acts(xs), mode)
        return ForwardOutput(z, self.denormalize(z @ self.W_dec + self.b_dec, ctx))

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise SAEConfigError(f"input has last dimension {x.shape[-1]} but this SAE has d_in={self.cfg.d_in}; "
                                 f"train or load an SAE for this hook point's width")
        if not x.is_floating_point():
            raise SAEConfigError(f"input dtype {x.dtype} is not floating point; pass activations as float tensors")
        return x.to(self.W_enc.dtype)

    # -- training -----------------------------------------------------------------------------
    def sparsity_loss(self, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return a.new_zeros(())

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def uses_auxk(self) -> bool:
        return False

    @torch.no_grad()
    def init_from_data(self, xs: torch.Tensor) -> None:
        """Architecture-specific initialisation from a normalised sample (after b_dec is set)."""

    def recon_loss(self, xs: torch.Tensor, x_hat: torch.Tensor, code) -> torch.Tensor:
        """The reconstruction term (mean squared error per element); `code` is the SparseCode (fast
        path) or dense z behind x_hat, for architectures whose loss looks inside it."""
        return (x_hat - xs).pow(2).mean()

    def optim_groups(self) -> list[dict]:
        """Parameter groups for the optimiser; `lr_scale` multiplies the run's learning rate."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def training_loss(self, x: torch.Tensor, fast: bool = True) -> TrainOutput:
        """Loss on a batch of inputs (input space). `fast` uses the sparse encoder/decoder where the
        architecture selects a fixed budget (TopK family); the dense path is the reference."""
        xs, _ = self.normalize_input(self._check_input(x))
        dead = self.dead_mask() if self.uses_auxk() and self.cfg.aux_alpha > 0 else None
        use_aux = dead is not None and bool(dead.any())
        if fast and self.uses_auxk():
            vals, rows, cols = _SparseEncode.apply(xs, self.W_enc, self.b_enc, self.b_dec,
                                                   lambda a: self.select(a, "train"))
            code = SparseCode(rows, cols, vals, (xs.shape[0], self.cfg.d_sae))
            x_hat = sparse_decode(code, self.W_dec) + self.b_dec
            l0 = torch.bincount(code.rows, minlength=xs.shape[0])
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=xs.device)
            fired[code.cols] = True
            sparsity = xs.new_zeros(())
        else:
            a = self.pre_acts(xs)
            z = self.activate(a, "train")
            x_hat = z @ self.W_dec + self.b_dec
            aux_code = None
            if use_aux:
                ra, ca = self.aux_select(a.detach(), dead)
                aux_code = SparseCode(ra, ca, a[ra, ca], a.shape)
            active = z != 0
            l0 = active.sum(-1)
            fired = active.any(0)
            sparsity = self.sparsity_loss(a, z)
        mse = self.recon_loss(xs, x_hat, code if fast and self.uses_auxk() else z)
        loss = mse + sparsity
        terms = {"mse": mse.detach(), "sparsity": sparsity.detach()}
        if use_aux:
            residual = (xs - x_hat).detach()
            e_hat = self.aux_reconstruction(xs, dead) if fast else aux_code.dense() @ self.W_dec
            aux = (e_hat - residual).pow(2).mean()
            loss = loss + self.cfg.aux_alpha * aux
            terms["aux"] = aux.detach()
        else:
            terms["aux"] = xs.new_zeros(())
        return TrainOutput(loss, terms, x_hat, xs, fired, l0)

    def aux_reconstruction(self, xs: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """AuxK's reconstruction from the dead latents alone, with dense matmuls over just their columns
        (B x n_dead x d_in each way: small while few latents are dead): their pre-activations again, each
        row's k_aux largest positive ones kept, decoded. The same values and gradients as the reference
        path (aux_select on the full pre-activations), at a fraction of the cost of routing B * k_aux more
        entries through the sparse encoder's backward (measured on 2 CPU cores at d_in=576, d_sae=4608,
        B=1024 with ~170 dead latents: AuxK's share of a step fell from ~25-30 ms to ~15 ms)."""
        idx = dead.nonzero().squeeze(1)
        a = torch.relu(torch.addmm(self.b_enc[idx], xs - self.b_dec, self.W_enc[:, idx]))
        if idx.numel() > self.cfg.k_aux:
            vals, pos = a.topk(self.cfg.k_aux, dim=-1, sorted=False)
            a = torch.zeros_like(a).scatter(-1, pos, vals)
        return a @ self.W_dec[idx]

    def aux_select(self, a: torch.Tensor, dead: torch.Tensor):
        """The k_aux largest pre-activations of dead latents in each row (positive ones only)."""
        n_dead = int(dead.sum())
        k_aux = min(self.cfg.k_aux, n_dead)
        dead_idx = dead.nonzero().squeeze(1)
        vals, idx = a[:, dead_idx].topk(k_aux, dim=-1, sorted=False)
        rows = torch.arange(a.shape[0], device=a.device).repeat_interleave(k_aux)
        cols = dead_idx[idx.reshape(-1)]
        keep = vals.reshape(-1) > 0
        return rows[keep], cols[keep]

    @torch.no_grad()
    def update_dead(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    @torch.no_grad()
    def after_step_stats(self, out: TrainOutput) -> dict:
        """Architecture-specific statistics after a training step (e.g. BatchTopK's threshold)."""
        return {}

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each decoder row's gradient parallel to the row."""
        if self.W_dec.grad is None:
            return
        W = self.W_dec.data
        W_unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        g = self.W_dec.grad
        g -= (g * W_unit).sum(-1, keepdim=True) * W_unit

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # -- SAELens-format files -----------------------------------------------------------------
    def inference_threshold(self) -> torch.Tensor | None:
        """Per-latent threshold used at inference (JumpReLU-style), or None."""
        return None

    def saelens_architecture(self) -> str:
        return {"topk": "topk", "relu": "standard"}.get(self.cfg.arch, "jumprelu")

    @torch.no_grad()
    def export_state(self) -> dict[str, torch.Tensor]:
        """SAELens tensors with a dataset-wide input scale folded in (so files need no extra step)."""
        s = float(self.input_scale) if self.cfg.normalize == "dataset" else 1.0
        state = {
            "W_enc": (self.W_enc * s).contiguous(),
            "b_enc": self.b_enc.clone(),
            "W_dec": (self.W_dec / s).contiguous(),
            "b_dec": (self.b_dec / s).clone(),
        }
        thr = self.inference_threshold()
        if thr is not None:
            state["threshold"] = thr.expand(self.cfg.d_sae).clone().contiguous()
        return {k: v.detach().float().cpu() for k, v in state.items()}

    def saelens_cfg(self) -> dict:
        c = self.cfg
        arch = self.saelens_architecture()
        cfg = {
            "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "layer_norm" if c.normalize == "token" else "none",
            "reshape_activations": "none",
            "metadata": {"model_name": c.model_name, "hook_name": c.hook_name, "context_size": c.context_size,
                         "dataset_path": c.dataset, "prepend_bos": True, "model_class_name": "saekit",
                         # SAELens's names for what was trained (it saves BatchTopK kinds as jumprelu too)
                         "training_architecture": {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk",
                                                   "topk": "topk", "jumprelu": "jumprelu",
                                                   "relu": "standard"}[c.arch],
                         "training_architecture_details": {"k": c.k} | (
                             {"matryoshka_widths": list(itertools.accumulate(c.group_sizes))}
                             if c.arch == "matryoshka" else {})},
            "saekit": {**c.to_dict(), "version": __version__, "input_scale_folded": float(self.input_scale)
                       if c.normalize == "dataset" else None, "theta": self.theta_info},
        }
        if arch == "topk":
            cfg["k"] = c.k
        if c.arch == "matryoshka":  # SAELens's training config name for the nested boundaries
            cfg["matryoshka_widths"] = list(itertools.accumulate(c.group_sizes))
        return cfg

    def save(self, folder: str | Path) -> Path:
        """Write cfg.json + sae_weights.safetensors (SAELens layout), atomically."""
        from .activations import atomic_write_bytes, atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.export_state()
        from safetensors.torch import save

        atomic_write_bytes(folder / WEIGHTS_FILE, lambda fh: fh.write(save(state, metadata={"format": "pt"})))
        atomic_write_json(folder / CFG_FILE, self.saelens_cfg())
        return folder


class BatchTopKSAE(SAE):
    """Top B*k pre-activations of the whole batch in training; a global threshold theta at inference."""

    arch = "batchtopk"
    candidate_factor = 0.5  # exact top-k among pre-activations above this fraction of theta (see batch_topk)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def uses_auxk(self) -> bool:
        return True

    def select(self, a, mode=None):
        mode = mode or ("batch" if self.training else "threshold")
        if mode == "threshold":
            if int(self.threshold_updates) == 0:
                raise SAEConfigError("this BatchTopK SAE has no inference threshold yet (it was never trained); "
                                     "use encode(x, mode='batch') or train it first")
            return (a > self.threshold).nonzero(as_tuple=True)
        if mode in ("batch", "train"):
            B, Fd = a.shape
            n = min(B * self.cfg.k, a.numel())
            hint = float(self.threshold) * self.candidate_factor if int(self.threshold_updates) else 0.0
            if mode == "train" and self.distributed:
                return self._select_global(a, hint)
            vals, flat = batch_topk(a, n, hint)
            keep = vals > 0
            flat, vals = flat[keep], vals[keep]
            rows, cols = flat // Fd, flat % Fd
            if mode == "train":
                self._last_min = vals.min() if vals.numel() else None
            return rows, cols
        raise SAEConfigError(f"unknown BatchTopK mode '{mode}'; use 'threshold' or 'batch'")

    def _select_global(self, a, hint):
        """Training selection over the global batch of every rank (see saekit.distributed)."""
        from . import distributed as D

        B, Fd = a.shape
        n_global = B * D.world_size() * self.cfg.k
        share = min(2 * B * self.cfg.k, a.numel())
        vals, flat = batch_topk(a, min(share + 1, a.numel()), hint)
        cut, exact = D.global_batch_cut(vals, n_global, share)
        if not exact:  # a rank holds more of the global top than its round-one share: gather its full top
            full = min(n_global, a.numel())
            vals, flat = batch_topk(a, full, hint)
            cut, _ = D.global_batch_cut(vals, n_global, full)
        keep = (vals >= cut) & (vals > 0)
        flat, vals = flat[keep], vals[keep]
        if cut > 0:
            self._last_min = a.new_tensor(cut)  # the global n-th largest, as one process would see it
        else:
            m = vals.min() if vals.numel() else a.new_tensor(float("inf"))
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MIN)
            self._last_min = m if torch.isfinite(m) else None
        return flat // Fd, flat % Fd

    @torch.no_grad()
    def after_step_stats(self, out: TrainOutput) -> dict:
        m = getattr(self, "_last_min", None)
        if m is not None:
            if int(self.threshold_updates) == 0:
                self.threshold.copy_(m)
            else:
                beta = min(self.cfg.threshold_beta, 1 - 1 / (int(self.threshold_updates) + 1))
                self.threshold.mul_(beta).add_((1 - beta) * m)
            self.threshold_updates += 1
        return {"theta": float(self.threshold)}

    def inference_threshold(self):
        return self.threshold.detach()

    @torch.no_grad()
    def first_latents(self, w: int) -> "BatchTopKSAE":
        """A BatchTopK SAE of this one's first w latents (same weights, same theta), in eval mode."""
        cfg = SAEConfig.from_dict({**self.cfg.to_dict(), "arch": "batchtopk", "d_sae": w, "k": min(self.cfg.k, w - 1),
                                   "group_sizes": None, "group_weights": None})
        sub = BatchTopKSAE(cfg).to(self.W_enc.device)
        sub.W_enc.copy_(self.W_enc[:, :w])
        sub.W_dec.copy_(self.W_dec[:w])
        sub.b_enc.copy_(self.b_enc[:w])
        sub.b_dec.copy_(self.b_dec)
        sub.input_scale.copy_(self.input_scale)
        sub.threshold.copy_(self.threshold)
        sub.threshold_updates.copy_(self.threshold_updates)
        return sub.eval()

    @torch.no_grad()
    def calibrate_threshold(self, batches) -> float:
        """Set theta to the mean over `batches` of the smallest activation BatchTopK keeps, using the
        final weights (the training-time running mean lags behind weights that were still moving)."""
        cuts = []
        for x in batches:
            xs, _ = self.normalize_input(self._check_input(x.to(self.W_enc.device)))
            a = self.pre_acts(xs)
            vals = batch_topk(a, min(a.shape[0] * self.cfg.k, a.numel()))[0]
            vals = vals[vals > 0]
            if vals.numel():
                cuts.append(vals.min())
        if cuts:
            running = float(self.threshold) if int(self.threshold_updates) else None
            self.threshold.copy_(torch.stack(cuts).mean())
            self.threshold_updates += len(cuts)
            self.theta_info = {"source": "training", "running_estimate": running,
                               "final_estimate": float(self.threshold), "final_estimate_batches": len(cuts),
                               "how": "mean over batches of the smallest activation BatchTopK keeps; the running "
                                      "estimate during training, the final one with the final weights (used)"}
        return float(self.threshold)

    @torch.no_grad()
    def threshold_for_l0(self, batches, target_l0: float, n_tokens: int) -> float:
        """The theta at which threshold mode gives exactly `target_l0` latents per token on average over
        `batches` (input space [B, d_in], n_tokens rows in all): halfway between the (n*target)-th and the
        next largest activation. Exact, holding at most n*target + 1 values."""
        count = int(round(n_tokens * target_l0))
        pool = None
        n = 0
        for x in batches:
            xs, _ = self.normalize_input(self._check_input(x.to(self.W_enc.device)))
            a = self.pre_acts(xs).flatten()
            n += xs.shape[0]
            a = a[a > (pool.min() if pool is not None and pool.numel() > count else 0)]
            pool = a if pool is None else torch.cat([pool, a])
            if pool.numel() > count + 1:
                pool = pool.topk(count + 1, sorted=False).values
        if n != n_tokens:
            raise SAEConfigError(f"the batches held {n} tokens, not the {n_tokens} announced")
        if pool is None or pool.numel() <= count:
            raise SAEConfigError(f"only {0 if pool is None else pool.numel()} positive activations on {n} tokens: "
                                 f"a mean L0 of {target_l0} cannot be reached; choose a smaller target")
        top = pool.topk(count + 1).values
        return float((top[count - 1] + top[count]) / 2) if count else float(top[0])


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda 2025): BatchTopK over the whole
    dictionary, and every nested prefix of latent groups must reconstruct the input on its own.

    The reconstruction term is the weighted mean of the prefixes' MSEs (SAELens sums them: the same
    up to a constant factor that Adam mostly absorbs). The per-group decodes share the one sparse
    code, so the decoder work equals one full decode. Inference as BatchTopK: one threshold theta.
    """

    arch = "matryoshka"

    @property
    def widths(self) -> list[int]:
        """Cumulative prefix sizes, e.g. [288, 576, 1152, 2304, 4608]."""
        return list(itertools.accumulate(self.cfg.group_sizes))

    def _weights(self) -> list[float]:
        w = self.cfg.group_weights or [1.0] * len(self.cfg.group_sizes)
        total = float(sum(w))
        return [float(v) / total for v in w]

    def group_of(self, latents: torch.Tensor) -> torch.Tensor:
        """Group index of each latent index."""
        return torch.bucketize(latents, torch.tensor(self.widths, device=latents.device), right=True)

    def recon_loss(self, xs, x_hat, code):
        lo, partial, losses = 0, self.b_dec.expand_as(xs), []
        for hi in self.widths[:-1]:
            if isinstance(code, SparseCode):
                m = (code.cols >= lo) & (code.cols < hi)
                part = sparse_decode(SparseCode(code.rows[m], code.cols[m], code.vals[m], code.shape), self.W_dec)
            else:
                part = code[:, lo:hi] @ self.W_dec[lo:hi]
            partial = partial + part
            losses.append((partial - xs).pow(2).mean())
            lo = hi
        losses.append((x_hat - xs).pow(2).mean())
        return sum(w * l for w, l in zip(self._weights(), losses))

    def prefix(self, n_groups: int) -> BatchTopKSAE:
        """A BatchTopK SAE made of the first n_groups groups (same weights, same theta). In threshold
        mode its code is exactly this SAE's code restricted to those latents, so every metric (NMSE,
        CE recovered) of a prefix is the metric of this object."""
        if not 1 <= n_groups <= len(self.cfg.group_sizes):
            raise SAEConfigError(f"n_groups must be in 1..{len(self.cfg.group_sizes)} (got {n_groups})")
        return self.first_latents(self.widths[n_groups - 1])


class TopKSAE(SAE):
    """The k largest pre-activations of each token."""

    arch = "topk"

    def uses_auxk(self) -> bool:
        return True

    def select(self, a, mode=None):
        vals, idx = a.topk(self.cfg.k, dim=-1, sorted=False)
        rows = torch.arange(a.shape[0], device=a.device).repeat_interleave(self.cfg.k)
        cols = idx.reshape(-1)
        keep = vals.reshape(-1) > 0
        return rows[keep], cols[keep]


class JumpReLUSAE(SAE):
    """Per-latent learned threshold (log-parametrised); L0 penalty through a straight-through estimator."""

    arch = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    def activate(self, a, mode=None):
        return _JumpReLU.apply(a, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth)

    def select(self, a, mode=None):
        return (a > self.log_threshold.exp()).nonzero(as_tuple=True)

    def sparsity_loss(self, a, z):
        l0 = _Step.apply(a, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth).sum(-1).mean()
        if self.cfg.target_l0:
            if self.distributed:  # the penalty of the global batch's L0 (not the mean of per-rank penalties)
                from . import distributed as D

                lg = l0.detach().clone()
                torch.distributed.all_reduce(lg)
                lg /= D.world_size()
                # value P(L_global); DDP's mean of the ranks' gradients is P'(L_global) * mean dL_rank
                return self.cfg.l0_coeff * ((lg / self.cfg.target_l0 - 1).pow(2)
                                            + 2 * (lg / self.cfg.target_l0 - 1) / self.cfg.target_l0 * (l0 - l0.detach()))
            return self.cfg.l0_coeff * (l0 / self.cfg.target_l0 - 1).pow(2)
        return self.cfg.l0_coeff * l0 / self.cfg.d_in

    def inference_threshold(self):
        return self.log_threshold.exp().detach()

    def optim_groups(self) -> list[dict]:
        rest = [p for n, p in self.named_parameters() if n != "log_threshold"]
        return [{"params": rest, "lr_scale": 1.0},
                {"params": [self.log_threshold], "lr_scale": self.cfg.threshold_lr_scale}]

    @torch.no_grad()
    def init_from_data(self, xs: torch.Tensor) -> None:
        """With a target L0, start every threshold at the value that gives that L0 on the sample.

        The log-threshold moves about lr per Adam step, so from a fixed 0.01 a few hundred steps
        never reach the ~2 (in per-token-normalised units) that an L0 of 16-64 of 4,608 needs;
        starting at the sample's global (target_l0 * n)-th largest pre-activation removes that lag.
        """
        if not self.cfg.target_l0:
            return
        xs = xs[:4096]
        a = self.pre_acts(xs).flatten()
        n = max(1, min(a.numel(), int(round(self.cfg.target_l0 * xs.shape[0]))))
        theta = a.topk(n, sorted=False).values.min().clamp_min(1e-4)
        self.log_threshold.fill_(math.log(float(theta)))


class ReLUSAE(SAE):
    """Plain ReLU code with an L1 penalty weighted by decoder row norms."""

    arch = "relu"

    def activate(self, a, mode=None):
        return a

    def select(self, a, mode=None):
        return (a > 0).nonzero(as_tuple=True)

    def sparsity_loss(self, a, z):
        return self.cfg.l1_coeff * (z * self.W_dec.norm(dim=-1)).sum(-1).mean() / self.cfg.d_in


SAE_CLASSES: dict[str, type[SAE]] = {"batchtopk": BatchTopKSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE,
                                     "relu": ReLUSAE, "matryoshka": MatryoshkaSAE}


def make_sae(cfg: SAEConfig | None = None, **kwargs) -> SAE:
    """Build an SAE from a config (or keyword fields of one)."""
    cfg = cfg or SAEConfig(**kwargs)
    return SAE_CLASSES[cfg.arch](cfg)


# ---------------------------------------------------------------------------------------------
# loading


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder: saekit's or SAELens's (`cfg.json` + `sae_weights.safetensors`, inference or
    training layout) or sparsify's (`cfg.json` + `sae.safetensors`)."""
    from . import interop

    folder = Path(folder)
    cfg_path = folder / CFG_FILE
    if (folder / interop.SPARSIFY_WEIGHTS).exists() and not (folder / WEIGHTS_FILE).exists():
        w_path = folder / interop.SPARSIFY_WEIGHTS
    else:
        w_path = folder / WEIGHTS_FILE
    if not cfg_path.exists() or not w_path.exists():
        raise SAEConfigError(f"{folder} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE} "
                             f"(saekit/SAELens) or {interop.SPARSIFY_WEIGHTS} (sparsify)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SAEConfigError(f"{cfg_path} is corrupt ({e})") from e
    try:
        state = load_file(str(w_path))
    except Exception as e:
        raise SAEConfigError(f"{w_path} is corrupt or truncated ({e.__class__.__name__}: {e})") from e
    state = {k: v.float() for k, v in state.items()}
    if w_path.name == interop.SPARSIFY_WEIGHTS:
        cfg, state = interop.from_sparsify(raw, state, w_path)
    elif raw.get("saekit"):
        ours = raw["saekit"]
        cfg = SAEConfig.from_dict({**ours, "normalize": "none" if ours.get("normalize") == "dataset"
                                   else ours.get("normalize", "none")})
    else:
        cfg, state = interop.from_saelens(raw, state, cfg_path)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in state:
            raise SAEConfigError(f"{w_path} has no '{key}' tensor (has {sorted(state)}); not an SAE weights file")
    d_in, d_sae = state["W_enc"].shape
    if (cfg.d_in, cfg.d_sae) != (d_in, d_sae):
        raise SAEConfigError(f"{folder}: cfg says d_in={cfg.d_in}, d_sae={cfg.d_sae} but W_enc is {tuple(state['W_enc'].shape)}")
    sae = make_sae(cfg)
    with torch.no_grad():
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, key).data = state[key].clone()
        thr = state.get("threshold")
        if raw.get("saekit"):
            sae.theta_info = raw["saekit"].get("theta")
        if isinstance(sae, BatchTopKSAE):
            if thr is None:
                raise SAEConfigError(f"{w_path}: a BatchTopK SAE needs a 'threshold' tensor for inference")
            sae.threshold.fill_(float(thr.mean()))
            sae.threshold_updates.fill_(1)
        elif isinstance(sae, JumpReLUSAE):
            if thr is None:
                raise SAEConfigError(f"{w_path}: a JumpReLU SAE needs a 'threshold' tensor")
            sae.log_threshold.data = thr.clamp_min(1e-12).log()
    return sae.to(device).eval()
