"""Where the sparse training path stops paying: saekit's fast path (sparse encoder backward and decoder) vs its
dense reference path, step for step, over dictionary sizes and code densities, in one run.

    python benchmarks/crossover.py [--quick]

Prints, for each shape, ms per step of both paths and their ratio; the constants in saekit/sae/base.py
(SPARSE_MIN_LATENTS, SPARSE_MAX_DENSITY) are read off this table (benchmarks/results/crossover_cpu.txt).
Each figure is the median of interleaved repetitions (dense, sparse, dense, sparse, ...) in this process.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import saekit.sae.base as base
from saekit.sae import SAEConfig, make_sae

SIZES = [  # (d_in, d_sae, batch, k): the teaching toy up to the CPU benchmark shape
    (48, 192, 4096, 5), (64, 512, 4096, 8), (128, 1024, 4096, 16), (256, 2048, 2048, 32), (576, 4608, 1024, 32)]
DENSITIES = [32, 128, 230, 460, 920, 1840]  # TopK's k at d_in=576, d_sae=4608, batch 1024: 0.7% .. 40% of entries


def step_ms(sae, opt, x, fast, reps):
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        out = sae.training_loss(x, fast=fast)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times[1:], out.path


def compare(arch, d, f, B, k, reps):
    torch.manual_seed(0)
    cfg = SAEConfig(arch=arch, d_in=d, d_sae=f, k=k, aux_alpha=0)
    saes = {fast: make_sae(cfg) for fast in (False, True)}
    opts = {fast: torch.optim.Adam(s.parameters(), lr=1e-4) for fast, s in saes.items()}
    x = torch.randn(B, d) * torch.rand(B, 1) * 4
    runs = {False: [], True: []}
    paths = {}
    for _ in range(3):  # interleaved rounds
        for fast in (False, True):
            t, paths[fast] = step_ms(saes[fast], opts[fast], x, fast, reps)
            runs[fast] += t
    dense, sparse = (statistics.median(runs[f]) * 1e3 for f in (False, True))
    assert paths == {False: "reference", True: "sparse"}, paths
    return dense, sparse


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (the test suite's smoke run)")
    a = ap.parse_args()
    reps = 1 if a.quick else 4
    base.SPARSE_MIN_LATENTS, base.SPARSE_MAX_DENSITY = 0, 1.0  # measure the sparse path everywhere
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per step over 3 x {reps} "
          f"interleaved repetitions; ratio = dense / sparse (> 1: the sparse path is faster)")
    print("\nby size (BatchTopK):")
    print(f"{'d_in':>6} {'d_sae':>7} {'batch':>6} {'k':>5} {'density':>8} {'dense ms':>9} {'sparse ms':>10} {'ratio':>6}")
    for d, f, B, k in (SIZES[:2] if a.quick else SIZES):
        dense, sparse = compare("batchtopk", d, f, B, k, reps)
        print(f"{d:>6} {f:>7} {B:>6} {k:>5} {k / f:>8.2%} {dense:>9.1f} {sparse:>10.1f} {dense / sparse:>6.2f}")
    print("\nby density (TopK, d_in=576, d_sae=4608, batch 1024):")
    print(f"{'k':>5} {'density':>8} {'dense ms':>9} {'sparse ms':>10} {'ratio':>6}")
    for k in (DENSITIES[:2] if a.quick else DENSITIES):
        dense, sparse = compare("topk", 576, 4608, 1024, k, reps)
        print(f"{k:>5} {k / 4608:>8.2%} {dense:>9.1f} {sparse:>10.1f} {dense / sparse:>6.2f}")


if __name__ == "__main__":
    main()
