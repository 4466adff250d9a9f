"""bf16 autocast on a CPU with AMX matrix units: what it saves per training step at several sizes, and what it costs
in held-out reconstruction, L0 and dead latents after the same training.

Part 1 (speed): saekit's BatchTopK Trainer step at the toy size of the teaching notebook up to the benchmark
shape, fp32 and bf16 autocast interleaved round by round (median and range over rounds of fp32 ms / bf16 ms).
Part 2 (quality): the two settings train from the same initialisation on the same batches, interleaved step by step
(benchmarks/interleaved.py), then are evaluated on the same held-out rows; the NMSE difference carries a paired 95%
bootstrap interval over held-out sequences. TrainConfig.autocast=None turns bf16 on by itself on a CPU whose torch
reports AMX tiles and AVX-512 BF16 (saekit.train.config.autocast_default); this benchmark is the evidence for it.

    python benchmarks/autocast_cpu.py --store runs/smollm2_l15/store_train --eval-store runs/smollm2_l15/store_test \\
        --hook resid_post.15 --steps 500 --seeds 0 1 2 [--archs batchtopk jumprelu relu matryoshka]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import interleaved
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer
from saekit.train.config import cpu_has_bf16_matrix_units

SHAPES = [(48, 192, 4096, 5), (128, 1024, 1024, 16), (256, 2048, 1024, 32), (576, 4608, 1024, 32)]


def speed(shapes, rounds: int, steps: int) -> None:
    print(f"{'d':>5} {'d_sae':>6} {'batch':>6} {'k':>3} {'fp32 ms':>8} {'bf16 ms':>8} {'fp32/bf16':>10} {'range':>12}")
    for d, f, B, k in shapes:
        torch.manual_seed(0)
        x = torch.randn(4, B, d) * torch.rand(4, B, 1) * 4
        trainers = {ac: Trainer([SAEConfig(arch="batchtopk", d_in=d, d_sae=f, k=k, dead_tokens=5 * B)],
                                TrainConfig(total_tokens=10**9, batch_size=B, lr=1e-3, warmup_steps=0, progress=False,
                                            device="cpu", b_dec_init="zeros", autocast=ac)) for ac in (False, True)}
        for tr in trainers.values():
            tr.initialise(x[0])
            tr.train_step(x[0])
            tr.train_step(x[1])
        ms = {ac: [] for ac in trainers}
        for _ in range(rounds):
            for ac, tr in trainers.items():
                t = time.perf_counter()
                for i in range(steps):
                    tr.train_step(x[i % 4])
                ms[ac].append((time.perf_counter() - t) / steps * 1e3)
        ratio = [a / b for a, b in zip(ms[False], ms[True])]
        print(f"{d:>5} {f:>6} {B:>6} {k:>3} {statistics.median(ms[False]):>8.2f} {statistics.median(ms[True]):>8.2f} "
              f"{statistics.median(ratio):>9.2f}x {min(ratio):>5.2f}-{max(ratio):.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    interleaved.add_arguments(ap, steps=600)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (speed)")
    ap.add_argument("--speed-steps", type=int, default=10, help="steps per round and setting (speed)")
    ap.add_argument("--shapes", default=None, help="speed shapes as d,d_sae,batch,k;... (default: toy to benchmark)")
    ap.add_argument("--archs", nargs="+", default=["batchtopk"], help="architectures of the quality part (JumpReLU "
                                                                      "at target L0 k)")
    a = ap.parse_args(argv)
    shapes = SHAPES if a.shapes is None else [tuple(map(int, s.split(","))) for s in a.shapes.split(";")]
    print(f"# python benchmarks/autocast_cpu.py --store {a.store} --eval-store {a.eval_store} --steps {a.steps} "
          f"--seeds {' '.join(map(str, a.seeds))}  ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, AMX bf16: {cpu_has_bf16_matrix_units()})")
    print(f"## speed: saekit BatchTopK step, {a.rounds} interleaved rounds of {a.speed_steps} steps")
    speed(shapes, a.rounds, a.speed_steps)
    print(f"## quality: d_sae = {a.expansion}x d_in, k={a.k}, batch {a.batch}, {a.steps} steps per setting, "
          f"interleaved step by step; held-out {a.eval_tokens:,} tokens; L0 with the trained threshold")
    for arch in a.archs:
        fields = {"arch": arch, **({"target_l0": a.k} if arch == "jumprelu" else {})}
        print(f"### {arch}\n{interleaved.header('setting')}")
        diffs = []
        for seed in a.seeds:
            r = interleaved.run(a, seed, {"fp32": (fields, {"autocast": False}), "bf16": (fields, {"autocast": True})})
            diffs.append(interleaved.print_seed(a, seed, r, ""))
        interleaved.over_seeds(diffs, f"{arch}:")


if __name__ == "__main__":
    main()
