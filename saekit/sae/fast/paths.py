"""The sparse training paths: each architecture's loss through a dense encode without autograd, then
only the selected entries differentiated and decoded. The same loss and gradients as
`SAE.reference_loss` (up to rounding); where the code is too dense or the dictionary too small
for that to pay, the reference path itself. Each returns a FastOutput: the TrainOutput and what the
trainer reads back to plan the next step."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..outputs import TrainOutput
from ..step import PLAIN, Step
from . import auxk
from .autograd import ThresholdPseudoGrad, sparse_decode, sparse_encode, sparse_stats
from .hints import Plan
from .index import CodeIndex, SparseCode
from .select import Entries, entries, entry_slots, top_entries

# the sparse path pays from this many latents, up to this share of active entries
# (benchmarks/results/crossover_cpu.txt)
SPARSE_MIN_LATENTS = 512
SPARSE_MAX_DENSITY = 0.05
THRESHOLDED = ("jumprelu", "relu")  # paths whose code is the entries above a threshold


class FastOutput(NamedTuple):
    """A training loss as the speed layer gives it: TrainOutput's fields, then what the trainer
    reads back to plan the next step."""

    loss: torch.Tensor
    terms: dict
    x_hat: torch.Tensor
    x: torch.Tensor
    fired: torch.Tensor
    l0: torch.Tensor
    cut: torch.Tensor | None = None
    path: str = "reference"  # "reference" (dense) or "sparse"
    # 0-dim bool: False where the selection must be redone with Plan(exact=True)
    exact: torch.Tensor | None = None
    count: torch.Tensor | None = None  # the entries a sparse path found without a read-back
    density: float | None = None  # active entries / (batch x d_sae) where the host knows it


def training_loss(
    sae, x: torch.Tensor, step: Step = PLAIN, plan: Plan | None = None, enabled: bool = True
) -> FastOutput:
    """The training loss of `sae` on inputs x: by its sparse path (`sae.fast_path`) where it has
    one and `enabled`, else by its reference path (`SAE.reference_loss`)."""
    if enabled and sae.fast_path is not None:
        return PATHS[sae.fast_path](sae, x, step, plan or Plan())
    return reference(sae, x, step)


def reference(sae, x: torch.Tensor, step: Step) -> FastOutput:
    """The architecture's own dense loss, where the sparse path does not pay."""
    return FastOutput(*sae.reference_loss(x, step))


def sparse_output(out: TrainOutput, exact=None, found: Entries | None = None) -> FastOutput:
    """A sparse path's TrainOutput with what it read: whether its selection was exact, and where it
    found entries above a bound, their number (a device tensor) or their share (known to the
    host)."""
    count = found.count if found is not None else None
    if isinstance(count, torch.Tensor):
        return FastOutput(*out, path="sparse", exact=exact, count=count)
    density = None if count is None else count / out.x_hat.shape[0] / out.fired.shape[0]
    return FastOutput(*out, path="sparse", exact=exact, density=density)


def sparse_pays(sae, n_active: int, batch: int) -> bool:
    """Whether the sparse path beats the dense one for a code of n_active entries in a [batch,
    d_sae] batch."""
    return (
        sae.cfg.d_sae >= SPARSE_MIN_LATENTS
        and n_active <= SPARSE_MAX_DENSITY * batch * sae.cfg.d_sae
    )


@torch.no_grad()
def probe_pays(sae, xs: torch.Tensor, count_active, plan: Plan, rows: int = 128) -> bool:
    """sparse_pays for a code whose density is known only after encoding (JumpReLU, ReLU): from the
    previous step's density where the plan knows it, else from the first `rows` rows'
    pre-activations."""
    if plan.density_hint is not None:
        return sparse_pays(sae, int(plan.density_hint * xs.shape[0] * sae.cfg.d_sae), xs.shape[0])
    a = sae.pre_acts(xs[:rows])
    return sparse_pays(sae, int(count_active(a)) * xs.shape[0] // max(1, a.shape[0]), xs.shape[0])


def centred_pre_acts(sae, xs: torch.Tensor, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(xs - b_dec, differentiable to b_dec; the pre-activations from it, without autograd): one
    centring serves the dense encode, the sparse encoder's backward and AuxK. relu=False where the
    selection keeps only positive entries anyway."""
    xc = xs - sae.b_dec
    with torch.no_grad():
        return xc, sae.pre_acts(xs, xc, relu)


def top_entries_loss(sae, x: torch.Tensor, step: Step, plan: Plan) -> FastOutput:
    """BatchTopK, TopK and Matryoshka: the selected entries encoded and decoded sparsely, one
    CodeIndex for both."""
    batch = x.shape[0]
    if not sparse_pays(sae, batch * sae.cfg.k, batch):
        return reference(sae, x, step)
    xs = sae.prepare(x)
    pad = auxk.padded(sae, plan)
    dead = auxk.dead_latents(sae, step, plan, pad)
    xc, a = centred_pre_acts(sae, xs, relu=step.distributed)  # the global cut compares zeros too
    with torch.no_grad():
        sel, exact = top_entries(sae, a, step, plan)
    index = CodeIndex(sel.rows, sel.cols, batch, sae.cfg.d_sae, rows_sorted=True)
    code = sparse_encode(xs, sae.W_enc, sae.b_enc, sae.b_dec, index, a, xc)
    if sae.has_prefixes:
        x_hat, dec_index, prefixes = prefix_decode(sae, code)
        mse = sae.prefix_loss(xs, prefixes)
    else:
        x_hat, dec_index = sparse_decode(code, sae.W_dec) + sae.b_dec, index
        mse = F.mse_loss(x_hat, xs)
    aux = None
    if dead is not None:
        recon = auxk.aux_reconstruction(
            sae, xc, dead, pad, fold=(index, code.vals, x_hat, dec_index)
        )
        aux = F.mse_loss(recon, (xs - x_hat).detach())
    fired, l0 = sparse_stats(sel.rows, sel.cols, batch, sae.cfg.d_sae, index=index)
    out = sae.train_output(xs, x_hat, mse=mse, aux=aux, fired=fired, l0=l0, cut=sel.cut)
    return sparse_output(out, exact)


def prefix_decode(sae, code: SparseCode) -> tuple[torch.Tensor, CodeIndex, list[torch.Tensor]]:
    """Matryoshka: every group's part of the code decoded at once (entries as rows group * batch +
    row: fixed shapes), and b_dec plus their running sums: (x_hat, the CodeIndex the decode read,
    every prefix's reconstruction, the last being x_hat)."""
    widths, batch = sae.widths, code.shape[0]
    group = sum((code.cols >= w).long() for w in widths[:-1])
    index = CodeIndex(group * batch + code.rows, code.cols, len(widths) * batch, sae.cfg.d_sae)
    parts = sparse_decode(code._replace(index=index), sae.W_dec).chunk(len(widths))
    sums = list(itertools.accumulate(parts, initial=sae.b_dec))[1:]
    return sums[-1], index, sums


def jumprelu_loss(sae, x: torch.Tensor, step: Step, plan: Plan) -> FastOutput:
    """JumpReLU: one scan finds the entries above the window's lower bound, a > θ - bandwidth / 2,
    which hold the code (a > θ) and the rectangle window (|a - θ| < bandwidth / 2). The code's
    entries are encoded and decoded sparsely; the thresholds get their pseudo-derivatives from
    the window's entries (ThresholdPseudoGrad)."""
    xs = sae.prepare(x)
    bw, batch = sae.cfg.jumprelu_bandwidth, xs.shape[0]
    theta0 = sae.log_threshold.detach().exp()
    if not probe_pays(sae, xs, lambda a: (a > theta0 - bw / 2).sum(), plan):
        return reference(sae, x, step)
    xc, a = centred_pre_acts(sae, xs)
    with torch.no_grad():
        e = entries(a, theta0 - bw / 2, step, plan)
        v, t = a[e.rows, e.cols], theta0[e.cols]
        on, window = v > t, (v > t - bw / 2) & (v < t + bw / 2)  # the code; the rectangle window
        if e.valid is not None:
            on, window = on & e.valid, window & e.valid
    if e.valid is None and not sparse_pays(sae, e.rows.numel(), batch):
        return reference(sae, x, step)
    theta = sae.log_threshold.exp()
    index = CodeIndex(e.rows, e.cols, batch, sae.cfg.d_sae, rows_sorted=True)
    # the window's: 0
    vals = sparse_encode(xs, sae.W_enc, sae.b_enc, sae.b_dec, index, a, xc).vals * on
    # carry dL/dz of the window to θ
    zeros = ThresholdPseudoGrad.apply(theta, e.cols, bw, True, window)
    code = SparseCode(e.rows, e.cols, vals + zeros.to(vals.dtype), (batch, sae.cfg.d_sae), index)
    x_hat = sparse_decode(code, sae.W_dec) + sae.b_dec
    l0 = (
        on.sum() / batch + ThresholdPseudoGrad.apply(theta, e.cols, bw, False, window).sum() / batch
    )
    fired, l0_rows = sparse_stats(e.rows, e.cols, batch, sae.cfg.d_sae, on)
    out = sae.train_output(
        xs,
        x_hat,
        mse=F.mse_loss(x_hat, xs),
        sparsity=sae.l0_penalty(l0, step),
        fired=fired,
        l0=l0_rows,
    )
    return sparse_output(out, e.exact, e)


def relu_loss(sae, x: torch.Tensor, step: Step, plan: Plan) -> FastOutput:
    """ReLU-L1: the positive pre-activations encoded and decoded sparsely, the L1 term on those
    entries alone."""
    xs = sae.prepare(x)
    batch = xs.shape[0]
    if not probe_pays(sae, xs, lambda a: (a > 0).sum(), plan):
        return reference(sae, x, step)
    xc, a = centred_pre_acts(sae, xs)
    with torch.no_grad():
        e = entries(a, 0, step, plan)
    if e.valid is None and not sparse_pays(sae, e.rows.numel(), batch):
        return reference(sae, x, step)
    index = CodeIndex(e.rows, e.cols, batch, sae.cfg.d_sae, rows_sorted=True)
    code = sparse_encode(xs, sae.W_enc, sae.b_enc, sae.b_dec, index, a, xc)
    if e.valid is not None:
        code = code._replace(vals=code.vals * e.valid)  # slots without an entry: 0, and no gradient
    x_hat = sparse_decode(code, sae.W_dec) + sae.b_dec
    l1 = (code.vals * sae.W_dec.norm(dim=-1)[e.cols]).sum() / batch
    fired, l0 = sparse_stats(e.rows, e.cols, batch, sae.cfg.d_sae, e.valid)
    sparsity = sae.cfg.l1_coeff * l1 / sae.cfg.d_in
    out = sae.train_output(
        xs, x_hat, mse=F.mse_loss(x_hat, xs), sparsity=sparsity, fired=fired, l0=l0
    )
    return sparse_output(out, e.exact, e)


PATHS = {"top": top_entries_loss, "jumprelu": jumprelu_loss, "relu": relu_loss}


def step_shape(sae, batch: int, plan: Plan) -> tuple | None:
    """What fixes the shapes of this SAE's next sparse step besides the batch and AuxK's slots (a
    recorded step is keyed by it): a thresholded code's entry slots. None where the step cannot be
    recorded: it takes the dense path, or lacks its hint (BatchTopK's first step)."""
    if sae.has_theta and plan.cut_hint is None:
        return None
    if sae.fast_path not in THRESHOLDED:
        return () if sparse_pays(sae, batch * sae.cfg.k, batch) else None
    density, d = plan.density_hint, sae.cfg.d_sae
    if density is None or not sparse_pays(sae, int(density * batch * d), batch):
        return None
    return (entry_slots(density, batch * d),)
