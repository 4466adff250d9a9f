"""A/B of implementation choices inside saekit's BatchTopK training step, on any device: each variant is a
Trainer from the same start on the same batches (5% of latents held dead, so AuxK runs), timed in interleaved
rounds; the figure is each round's variant time over the current code's in the same round (median, range).
It also lists where the step reads back from the device (on a GPU each read-back stalls the host): CUDA's sync
debug mode on a GPU, the operators that read back as torch dispatches them elsewhere (DispatchReadBacks).

    python benchmarks/step_variants.py [--device cuda] [--tf32] [--d 768 --d-sae 6144 --batch 4096]

Variants (the current code is the baseline):
  bias after product   pre-activations as mm then add_ of b_enc (the code before the bias moved into addmm)
  sync-free selection  sync_free on (the default on an accelerator; on the CPU the read-back selection is)
  read-back selection  sync_free off: BatchTopK's exact selection (a nonzero whose size the host waits for) and
                       the dead latents found by a read-back
  theta hint (before)  the selection of the code before the previous cut became the hint: 0.9 theta read back,
                       the dead latents found by a read-back
  input grad (before)  the sparse encoder's backward with the input's gradient always (the code before it was
                       computed only when asked for)
  AuxK scatter (before) AuxK's dead rows by plain indexing, their gradients scattered by autograd into
                       zero-filled gradients of the parameters' full size (before auxk.DeadColumns)
  AuxK fp32 (before)   AuxK in fp32 over exactly the dead latents on the CPU (before its grid of sizes and bf16
                       under the CPU's autocast, auxk.aux_bucket)
With --arch jumprelu or relu (their usual sparsity, L0 ~ 32):
  probe every step     the path chosen from a probe encode of 128 rows at every step (the code before the
                       previous step's density was kept for that)
  sync-free entries    sync_free on (the default on an accelerator): the entries found into slots sized by the
                       previous step's density, without a read-back
  split code, window   (jumprelu) the one scan's entries split into the code and the window (two more read-backs),
                       each encoded or decoded apart, the decode indexing their concatenation anew: the code before
                       the entries stayed together with masks (2026-11-27)
With --arch matryoshka:
  decode twice (before) every group's part from one decode, and the whole code decoded again for the
                       reconstruction (the code before the prefixes' running sums gave it, 2026-11-27)
  decode per group     each group's entries decoded apart (a boolean mask per group, whose size the host reads
                       back): the code before every group's part came from one decode
(Earlier JumpReLU variants, "two scans" and "window as a kernel", timed code that no longer exists: their figures
are in benchmarks/results/step_variants_cpu.txt.)
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from saekit.sae import SAEConfig
from saekit.sae.architectures import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE
from saekit.sae.auxk import DeadLatents
from saekit.sae.base import SAE
from saekit.sae.kernels import (CodeIndex, SparseCode, SparseEncode, ThresholdPseudoGrad, batch_topk,
                                positive_entries, rectangle, sparse_decode, sparse_encode, sparse_stats)
from saekit.train import TrainConfig, Trainer


@contextlib.contextmanager
def patched(cls, name, fn):
    old = cls.__dict__[name]
    setattr(cls, name, fn)
    try:
        yield
    finally:
        setattr(cls, name, old)


def bias_after_product(self, x, xc=None, relu=True):
    a = torch.mm(x - self.b_dec if xc is None else xc, self.W_enc).add_(self.b_enc)
    return a.relu_() if relu else a


def exact_selection(self, a):
    return self.select(a, "train")


def theta_hint_selection(self, a):
    hint = float(self.threshold) * self.candidate_factor
    vals, flat = batch_topk(a, min(a.shape[0] * self.cfg.k, a.numel()), hint, positive=True)
    return positive_entries(vals, flat, a.shape[1], a.numel())


def dead_read_back(self, since, n_dead=None):
    BASE_SET_DEAD(self, since, None)


@contextlib.contextmanager
def read_back_variant(select):
    with patched(BatchTopKSAE, "train_select", select), patched(DeadLatents, "set_dead_counters", dead_read_back):
        yield


def probe_every_step(self, xs, count_active, rows=128):
    a = self.pre_acts(xs[:rows])
    return self.sparse_pays(int(count_active(a)) * xs.shape[0] // max(1, a.shape[0]), xs.shape[0])


def split_code_and_window(self, x):
    """JumpReLUSAE.fast_loss as it was before its entries stayed together with masks (a copy: the baseline)."""
    xs, _ = self.normalize_input(self._check_input(x))
    bw = self.cfg.jumprelu_bandwidth
    theta0 = self.log_threshold.detach().exp()
    if not self.probe_pays(xs, lambda a: (a > theta0).sum() + rectangle(a, theta0, bw).sum()):
        return self.reference_loss(x)
    with torch.no_grad():
        a = self.pre_acts(xs)
        half = bw / 2
        rows, cols = (a > theta0 - half).nonzero(as_tuple=True)
        v, t = a[rows, cols], theta0[cols]
        on, window = (v > t).nonzero().squeeze(1), (v < t + half).nonzero().squeeze(1)
        rows, cols, wr, wc = rows[on], cols[on], rows[window], cols[window]
    if not self.sparse_pays(rows.numel() + wr.numel(), xs.shape[0]):
        return self.reference_loss(x)
    theta = self.log_threshold.exp()
    vals = sparse_encode(xs, self.W_enc, self.b_enc, self.b_dec,
                         CodeIndex(rows, cols, xs.shape[0], self.cfg.d_sae, rows_sorted=True), a).vals
    zeros = ThresholdPseudoGrad.apply(theta, wc, bw, True)
    code = SparseCode(torch.cat([rows, wr]), torch.cat([cols, wc]), torch.cat([vals, zeros.to(vals.dtype)]),
                      (xs.shape[0], self.cfg.d_sae))
    x_hat = sparse_decode(code, self.W_dec) + self.b_dec
    l0 = rows.numel() / xs.shape[0] + ThresholdPseudoGrad.apply(theta, wc, bw, False).sum() / xs.shape[0]
    return self._finish(xs, x_hat, self.recon_loss(xs, x_hat, code), self.l0_penalty(l0), None,
                        *sparse_stats(rows, cols, xs.shape[0], self.cfg.d_sae), None, "sparse",
                        n_active=rows.numel() + wr.numel())


def decode_twice(self, xs, x_hat, code):
    """MatryoshkaSAE.recon_loss before its code was decoded once (a copy: the baseline): every group's part from
    one decode, besides the base's decode of the whole code for x_hat."""
    widths, batch = self.widths, xs.shape[0]
    if not isinstance(code, SparseCode):
        return MATRYOSHKA_RECON(self, xs, x_hat, code)
    group = sum((code.cols >= w).long() for w in widths[:-1])
    parts = sparse_decode(SparseCode(group * batch + code.rows, code.cols, code.vals,
                                     (len(widths) * batch, self.cfg.d_sae)), self.W_dec)
    partial, losses = self.b_dec.expand_as(xs), []
    for part in parts.view(len(widths), batch, -1).unbind(0)[:-1]:
        partial = partial + part
        losses.append(F.mse_loss(partial, xs))
    losses.append(F.mse_loss(x_hat, xs))
    return sum(w * l for w, l in zip(self._weights(), losses))


@contextlib.contextmanager
def whole_decode(recon_loss):
    """Matryoshka's step with the base's decode of the whole code and the given recon_loss (the code before)."""
    with patched(MatryoshkaSAE, "sparse_reconstruction", SAE.sparse_reconstruction), \
            patched(MatryoshkaSAE, "recon_loss", recon_loss):
        yield


def decode_per_group(self, xs, x_hat, code):
    """MatryoshkaSAE.recon_loss as it was before one decode gave every group's part (a copy: the baseline)."""
    lo, partial, losses = 0, self.b_dec.expand_as(xs), []
    for hi in self.widths[:-1]:
        if isinstance(code, SparseCode):
            keep = (code.cols >= lo) & (code.cols < hi)
            rows, cols = code.rows[keep], code.cols[keep]
            part = sparse_decode(SparseCode(rows, cols, code.vals[keep], code.shape,
                                            CodeIndex(rows, cols, *code.shape, code.index is not None
                                                      and code.index.perm is None)), self.W_dec)
        else:
            part = code[:, lo:hi] @ self.W_dec[lo:hi]
        partial = partial + part
        losses.append((partial - xs).pow(2).mean())
        lo = hi
    losses.append((x_hat - xs).pow(2).mean())
    return sum(w * l for w, l in zip(self._weights(), losses))


@staticmethod
def encode_backward_with_input_gradient(ctx, g):
    """SparseEncode's backward before 2026-11-27: the input's gradient always (an embedding_bag over every entry
    and a transposed copy of W_enc), b_dec's as its row sum."""
    xc, W_enc, cols = ctx.saved_tensors
    index = ctx.index
    g = g.to(W_enc.dtype)
    grad_xc = index.row_sum(g, W_enc.t().contiguous())
    grad_W_enc = index.col_sum(g, xc.to(W_enc.dtype)).t()
    if grad_W_enc.stride() != W_enc.stride():
        grad_W_enc = torch.empty_like(W_enc).copy_(grad_W_enc)
    grad_b_enc = torch.zeros(index.n_cols, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
    return grad_xc.to(xc.dtype), grad_W_enc, grad_b_enc, -grad_xc.sum(0), None, None, None, None, None


AUX = DeadLatents.aux_reconstruction


def aux_scattered(self, xc, idx, fold=None):
    """AuxK's dead rows by plain indexing: autograd scatters their gradients into zero-filled full-size ones."""
    return AUX(self, xc, idx)


def aux_fp32_exact(self, xc, idx, fold=None):
    """AuxK in fp32 on the CPU, over exactly the dead latents (the code before commit a894695's grid of sizes)."""
    if xc.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return AUX(self, xc, idx, fold)
    return AUX(self, xc, idx, fold)


@contextlib.contextmanager
def aux_before_grid():
    with patched(DeadLatents, "_aux_padded", lambda self: self.aux_capacity is not None), \
            patched(DeadLatents, "aux_reconstruction", aux_fp32_exact):
        yield


PROBE_VARIANTS = {"current": contextlib.nullcontext,
                  "probe every step": lambda: patched(SAE, "probe_pays", probe_every_step),
                  "sync-free entries": lambda: patched(SAE, "sync_free", True)}
JUMPRELU_VARIANTS = {**PROBE_VARIANTS,
                     "split code, window": lambda: patched(JumpReLUSAE, "fast_loss", split_code_and_window)}
MATRYOSHKA_VARIANTS = {"current": contextlib.nullcontext,
                       "decode twice (before)": lambda: whole_decode(decode_twice),
                       "decode per group": lambda: whole_decode(decode_per_group)}
MATRYOSHKA_RECON = MatryoshkaSAE.recon_loss
BASE_SET_DEAD = SAE.set_dead_counters
VARIANTS = {"current": contextlib.nullcontext,
            "bias after product": lambda: patched(SAE, "pre_acts", bias_after_product),
            "sync-free selection": lambda: patched(SAE, "sync_free", True),
            "read-back selection": lambda: read_back_variant(exact_selection),
            "theta hint (before)": lambda: read_back_variant(theta_hint_selection),
            "input grad (before)": lambda: patched(SparseEncode, "backward", encode_backward_with_input_gradient),
            "AuxK scatter (before)": lambda: patched(DeadLatents, "aux_reconstruction", aux_scattered),
            "AuxK fp32 (before)": aux_before_grid}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _saekit_line() -> str:
    frames = [f for f in traceback.extract_stack() if "/saekit/" in f.filename]
    return f"{frames[-1].filename.split('/saekit/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


class DispatchReadBacks(TorchDispatchMode):
    """The saekit lines that make the host wait for the device, found where torch dispatches each operator: a value
    read back (item, bool, float) or an output whose size depends on the data (nonzero, a boolean-mask index). The
    stand-in on any device for CUDA's sync debug mode; it does not see a .tolist() (not dispatched), so the
    Trainer's one deliberate read-back per step is not listed."""

    WAITS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2",
             "unique_consecutive", "bincount"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.kernels = 0  # operators dispatched that compute (views and detach excluded): a GPU's kernel launches, ~

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.kernels += not (func.is_view or name in ("detach", "_record_function_enter_new", "_record_function_exit"))
        masks = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) or ())
        if name in self.WAITS or masks or (name == "repeat_interleave" and not (kwargs or {}).get("output_size")):
            self.found.append(f"{name}: {_saekit_line()}")
        return func(*args, **(kwargs or {}))


def operators(tr: Trainer, x: torch.Tensor) -> int:
    """Operators one training step dispatches (DispatchReadBacks.kernels)."""
    with DispatchReadBacks() as seen:
        tr.train_step(x)
    return seen.kernels


def read_backs(tr: Trainer, x: torch.Tensor) -> list[str]:
    """The saekit lines that read back from the device in one step: CUDA's sync debug mode on a GPU (every
    read-back), DispatchReadBacks elsewhere (all but the Trainer's .tolist())."""
    if x.device.type != "cuda":
        with DispatchReadBacks() as seen:
            tr.train_step(x)
        return seen.found
    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        where = _saekit_line()
        found.append(where if where != "?" else str(message)[:80])

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            tr.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", default="batchtopk", choices=["batchtopk", "jumprelu", "relu", "matryoshka"])
    a = ap.parse_args(argv)
    variants = {"batchtopk": VARIANTS, "jumprelu": JUMPRELU_VARIANTS, "relu": PROBE_VARIANTS,
                "matryoshka": MATRYOSHKA_VARIANTS}[a.arch]
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(a.batch, a.d, generator=g) * torch.rand(a.batch, 1, generator=g) * 4).to(dev) for _ in range(8)]
    trainers, holds = {}, {}
    for name in variants:
        torch.manual_seed(0)
        tr = Trainer([SAEConfig(arch=a.arch, d_in=a.d, d_sae=a.d_sae, k=32, target_l0=32, dead_tokens=5 * a.batch)],
                     TrainConfig(total_tokens=10**9, batch_size=a.batch, warmup_steps=0, progress=False, device=str(dev)))
        tr.initialise(torch.cat(xs[:2]))
        sae = tr.saes[0]
        if a.arch == "relu":  # a trained ReLU-L1's sparsity (L0 ~ 32), as benchmarks/train_step.py sets it
            with torch.no_grad():
                sae.b_enc -= sae.pre_acts(sae.normalize_input(xs[0])[0]).flatten().topk(a.batch * 32).values.min()
        with variants[name]():
            for x in xs[:3]:
                tr.train_step(x)
        sae.tokens_since_fired[: a.d_sae // 20] = 10 * sae.cfg.dead_tokens  # 5% dead: AuxK runs every step
        trainers[name], holds[name] = tr, (sae.tokens_since_fired.clone(), int(sae.dead_mask().sum()))
    times = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, tr in trainers.items():
            with variants[name]():
                sync(dev)
                t = time.perf_counter()
                for i in range(a.steps):
                    tr.train_step(xs[i % len(xs)])
                    tr.saes[0].set_dead_counters(*holds[name])  # the same dead set every step, its number known
                sync(dev)
            times[name].append((time.perf_counter() - t) / a.steps * 1e3)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"saekit {a.arch} step variants on {where} (torch {torch.__version__}{', tf32' if a.tf32 else ''}): "
          f"d={a.d}, d_sae={a.d_sae}, B={a.batch}, k=32 (L0 ~ 32), 5% dead; {a.rounds} interleaved rounds of {a.steps} steps")
    print(f"{'variant':<22}{'ms/step':>9}{'variant/current':>18}{'range':>16}")
    for name in variants:
        ratio = [t / c for t, c in zip(times[name], times["current"])]
        print(f"{name:<22}{statistics.median(times[name]):>9.2f}{statistics.median(ratio):>18.3f}"
              f"{min(ratio):>8.3f}-{max(ratio):.3f}")
    print("(variant/current > 1: the variant is slower than the current code)")
    listed = {"batchtopk": ("sync-free selection", "read-back selection"),
              "matryoshka": ("current", "decode twice (before)", "decode per group")}
    for name in listed.get(a.arch, ("current", "sync-free entries")):
        # off a GPU, sync_free set (False, the CPU's selection, unless the variant sets it): the step reads back as
        # on a GPU (the Trainer's one .tolist(), theta on the device), not with the CPU's cheaper read per value
        stand_in = patched(SAE, "sync_free", False) if dev.type != "cuda" else contextlib.nullcontext()
        with stand_in, variants[name]():
            lines = read_backs(trainers[name], xs[0])
            n_ops = operators(trainers[name], xs[1])
        how = "CUDA sync debug mode" if dev.type == "cuda" else "at dispatch, besides the Trainer's one .tolist()"
        print(f"\n'{name}': {n_ops} operators dispatched in one step (views excluded)")
        print(f"read-backs to the host in one step of '{name}' ({how}): {len(lines)}")
        for line in lines:
            print("  " + line)


if __name__ == "__main__":
    main()
