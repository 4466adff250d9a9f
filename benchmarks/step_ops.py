"""What the host does in one training step: the operators it dispatches, each a kernel launch on a GPU (views
excluded: they launch nothing), for every architecture stepping as on a GPU (selection without read-backs, one
stacked read-back, theta on the device) and as on the CPU, against the plain dense BatchTopK step (the paper's
reference code, benchmarks/train_step.py) in the same run. On a GPU the eager sparse step is bound by the host
(benchmarks/results/profile_step_cuda.txt: the GPU busy 1.9 ms of a 5.1 ms step, 154 kernel launches), so fewer
operators is a faster step there; the counts do not depend on the device, so this runs anywhere.

    python benchmarks/step_ops.py [--d 64 --d-sae 2048 --batch 512 --k 8]

The shape only has to put each architecture on its sparse path with some latents dead (AuxK runs): the counts
depend on the path, not on the sizes. Deterministic: one step after 30 (the hints, dead latents and Adam's state
are set).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import PlainBatchTopK, plain_step  # noqa: E402

import saekit.sae.base as base  # noqa: E402
from saekit.sae import SAEConfig  # noqa: E402
from saekit.train import TrainConfig, Trainer  # noqa: E402

VIEWS = {"detach", "t", "view", "squeeze", "unsqueeze", "slice", "select", "expand", "as_strided", "_unsafe_view",
         "permute", "alias", "reshape", "_record_function_enter_new", "_record_function_exit"}


class Count(TorchDispatchMode):
    """Operators dispatched, views and profiler scopes apart."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in VIEWS:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def saekit_step(arch: str, gpu_way: bool, d: int, f: int, B: int, k: int, x: torch.Tensor) -> tuple[Count, str]:
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, d_in=d, d_sae=f, k=k, target_l0=k, l1_coeff=1.0, dead_tokens=4 * B,
                    group_sizes=[f // 8, f // 8 * 3, f // 2] if arch == "matryoshka" else None)
    tr = Trainer([cfg], TrainConfig(total_tokens=10**9, batch_size=B, warmup_steps=4, progress=False,
                                    autocast=False))
    tr.saes[0].sync_free = gpu_way  # True: select without read-backs, as on a GPU; None: the CPU's way
    tr.initialise(x[:2048])
    for i in range(30):
        tr.train_step(x[i * B:(i + 1) * B])
    with Count() as c:
        stats = tr.train_step(x[30 * B:31 * B])[0]
    return c, f"aux {float(stats['aux']):.3f}"


def plain(d: int, f: int, B: int, k: int, x: torch.Tensor) -> Count:
    torch.manual_seed(0)
    m = PlainBatchTopK(d, f, k)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    for i in range(30):
        plain_step(m, opt, x[i * B:(i + 1) * B], 4 * B)
    with Count() as c:
        plain_step(m, opt, x[30 * B:31 * B], 4 * B)
    return c


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--archs", nargs="+", default=["batchtopk", "topk", "jumprelu", "relu", "matryoshka"])
    a = ap.parse_args(argv)
    d, f, B, k = a.d, a.d_sae, a.batch, a.k
    torch.manual_seed(0)
    x = torch.randn(31 * B, d) * torch.rand(31 * B, 1) * 4
    ref = plain(d, f, B, k, x)
    kept = base.SPARSE_MIN_LATENTS, base.SPARSE_MAX_DENSITY
    base.SPARSE_MIN_LATENTS, base.SPARSE_MAX_DENSITY = 0, 1.0  # the sparse path at any size (restored at the end)
    try:
        return _table(a, d, f, B, k, x, ref)
    finally:
        base.SPARSE_MIN_LATENTS, base.SPARSE_MAX_DENSITY = kept


def _table(a, d, f, B, k, x, ref) -> dict:
    print(f"operators dispatched in one training step (views apart), d={d}, d_sae={f}, batch={B}, k={k}, fp32; "
          f"x = this step's / the plain dense step's ({ref.ops} operators, {ref.views} views)")
    print(f"{'architecture':<12} {'way':<4} {'operators':>9} {'x':>6} {'views':>6}  note")
    out = {"plain": ref.ops}
    for arch in a.archs:
        for gpu_way in (True, None):
            c, note = saekit_step(arch, gpu_way, d, f, B, k, x)
            way = "GPU" if gpu_way else "CPU"
            out[f"{arch} {way}"] = c.ops
            print(f"{arch:<12} {way:<4} {c.ops:>9} {c.ops / ref.ops:>6.2f} {c.views:>6}  {note}")
    return out


if __name__ == "__main__":
    main()
