"""A/B of implementation choices inside saekit's BatchTopK training step, on any device: each variant is a
Trainer from the same start on the same batches (5% of latents held dead, so AuxK runs), timed in interleaved
rounds; the figure is each round's variant time over the current code's in the same round (median, range).
On a GPU it also lists where the step reads back from the device (each read-back stalls the host).

    python benchmarks/step_variants.py [--device cuda] [--tf32] [--d 768 --d-sae 6144 --batch 4096]

Variants (the current code is the baseline):
  bias after product   pre-activations as mm then add_ of b_enc (the code before the bias moved into addmm)
  device theta hint    BatchTopK's candidate hint kept on the device as a 0-dim tensor (no read-back; the
                       compare against a device tensor is not vectorised); the current code reads theta back
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import traceback
import warnings

import torch

from saekit.sae import SAEConfig
from saekit.sae.architectures import BatchTopKSAE
from saekit.sae.base import SAE
from saekit.sae.kernels import batch_topk, positive_entries
from saekit.train import TrainConfig, Trainer


@contextlib.contextmanager
def patched(cls, name, fn):
    old = cls.__dict__[name]
    setattr(cls, name, fn)
    try:
        yield
    finally:
        setattr(cls, name, old)


def bias_after_product(self, x):
    return torch.mm(x - self.b_dec, self.W_enc).add_(self.b_enc).relu_()


def device_theta_hint(self, a, mode=None):
    if (mode or ("batch" if self.training else "threshold")) != "train" or self.distributed:
        return BASE_SELECT(self, a, mode)
    hint = self.threshold * self.candidate_factor
    vals, flat = batch_topk(a, min(a.shape[0] * self.cfg.k, a.numel()), hint, positive=True)
    return positive_entries(vals, flat, a.shape[1], a.numel())


BASE_SELECT = BatchTopKSAE.select
VARIANTS = {"current": contextlib.nullcontext,
            "bias after product": lambda: patched(SAE, "pre_acts", bias_after_product),
            "device theta hint": lambda: patched(BatchTopKSAE, "select", device_theta_hint)}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def read_backs(tr: Trainer, x: torch.Tensor) -> list[str]:
    """The saekit lines that read back from the device in one step (CUDA's sync debug mode)."""
    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "/saekit/" in f.filename]
        found.append(f"{frames[-1].filename.split('/saekit/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames
                     else str(message)[:80])

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
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(a.batch, a.d, generator=g) * torch.rand(a.batch, 1, generator=g) * 4).to(dev) for _ in range(8)]
    trainers, holds = {}, {}
    for name in VARIANTS:
        torch.manual_seed(0)
        tr = Trainer([SAEConfig(arch="batchtopk", d_in=a.d, d_sae=a.d_sae, k=32, dead_tokens=5 * a.batch)],
                     TrainConfig(total_tokens=10**9, batch_size=a.batch, warmup_steps=0, progress=False, device=str(dev)))
        tr.initialise(torch.cat(xs[:2]))
        sae = tr.saes[0]
        with VARIANTS[name]():
            for x in xs[:3]:
                tr.train_step(x)
        sae.tokens_since_fired[: a.d_sae // 20] = 10 * sae.cfg.dead_tokens  # 5% dead: AuxK runs every step
        trainers[name], holds[name] = tr, sae.tokens_since_fired.clone()
    times = {name: [] for name in VARIANTS}
    for _ in range(a.rounds):
        for name, tr in trainers.items():
            with VARIANTS[name]():
                sync(dev)
                t = time.perf_counter()
                for i in range(a.steps):
                    tr.train_step(xs[i % len(xs)])
                    tr.saes[0].tokens_since_fired.copy_(holds[name])
                sync(dev)
            times[name].append((time.perf_counter() - t) / a.steps * 1e3)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"saekit BatchTopK step variants on {where} (torch {torch.__version__}{', tf32' if a.tf32 else ''}): "
          f"d={a.d}, d_sae={a.d_sae}, B={a.batch}, k=32, 5% dead; {a.rounds} interleaved rounds of {a.steps} steps")
    print(f"{'variant':<22}{'ms/step':>9}{'variant/current':>18}{'range':>16}")
    for name in VARIANTS:
        ratio = [t / c for t, c in zip(times[name], times["current"])]
        print(f"{name:<22}{statistics.median(times[name]):>9.2f}{statistics.median(ratio):>18.3f}"
              f"{min(ratio):>8.3f}-{max(ratio):.3f}")
    print("(variant/current > 1: the variant is slower than the current code)")
    if dev.type == "cuda":
        lines = read_backs(trainers["current"], xs[0])
        print(f"\nread-backs to the host in one step of the current code: {len(lines)}")
        for line in lines:
            print("  " + line)


if __name__ == "__main__":
    main()
