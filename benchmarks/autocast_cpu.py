"""bf16 autocast on a CPU with bf16 hardware (AVX-512 BF16, with AMX tiles or without): what it saves per training
step at several sizes, and what it costs in held-out reconstruction, L0 and dead latents after the same training.

Part 1 (speed): saekit's BatchTopK Trainer step at the toy size of the teaching notebook up to the benchmark
shape, fp32 and bf16 autocast interleaved round by round (median and range over rounds of fp32 ms / bf16 ms).
Part 2 (quality): the two settings train from the same initialisation on the same batches, interleaved step by step
(benchmarks/interleaved.py), then are evaluated on the same held-out rows; the NMSE difference carries a paired 95%
bootstrap interval over held-out sequences. TrainConfig.autocast=None turns bf16 on by itself on a CPU whose torch
reports AVX-512 BF16 (saekit.train.config.autocast_default); this benchmark is the evidence for it.

    python benchmarks/autocast_cpu.py --store runs/smollm2_l15/store_train --eval-store runs/smollm2_l15/store_test \\
        --hook resid_post.15 --steps 500 --seeds 0 1 2 [--archs batchtopk jumprelu relu matryoshka]
    python benchmarks/autocast_cpu.py --sizes     # where it pays: part 1 over a grid of sizes, no store needed

`--sizes` times the step over a grid from d=16, d_sae=64 to the benchmark shape at 64 to 4,096 rows, and checks the
size rule of the default (saekit.train.config.bf16_pays_on_cpu) against it: which setting the rule picks at each
size, and whether that was the faster one.
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
from saekit.train.config import CPU_BF16_MIN_WORK, bf16_pays_on_cpu, cpu_has_bf16_hardware

SHAPES = [(48, 192, 4096, 5), (128, 1024, 1024, 16), (256, 2048, 1024, 32), (576, 4608, 1024, 32)]
SIZES = [(16, 128, 64, 4), (16, 64, 1024, 4), (16, 128, 1024, 4), (32, 256, 256, 8), (16, 128, 4096, 4),
         (32, 256, 1024, 8), (48, 192, 1024, 5), (64, 512, 512, 8), (128, 1024, 256, 16), (64, 512, 1024, 8),
         (32, 256, 4096, 8), (48, 192, 4096, 5), (64, 512, 2048, 8), (128, 1024, 512, 16), (96, 384, 2048, 8),
         (256, 2048, 256, 32), (64, 512, 4096, 8), (128, 1024, 1024, 16), (576, 4608, 128, 32), (576, 4608, 256, 32),
         (576, 4608, 512, 32), (576, 4608, 1024, 32), (576, 4608, 64, 32), (256, 2048, 128, 32)]


def speed(shapes, rounds: int, steps: int, rule: bool = False) -> None:
    """fp32 ms / bf16 ms of the BatchTopK step at each shape; rule: also the default's choice there (on a CPU
    with bf16 hardware) and whether it was the faster setting (the median ratio's side of 1)."""
    print(f"{'d':>5} {'d_sae':>6} {'batch':>6} {'k':>3} {'fp32 ms':>8} {'bf16 ms':>8} {'fp32/bf16':>10} {'range':>12}"
          + (f" {'rows x d x d_sae':>17} {'default':>8} {'faster?':>8}" if rule else ""))
    picked = {True: [], False: []}
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
        line = (f"{d:>5} {f:>6} {B:>6} {k:>3} {statistics.median(ms[False]):>8.2f} {statistics.median(ms[True]):>8.2f} "
                f"{statistics.median(ratio):>9.2f}x {min(ratio):>5.2f}-{max(ratio):.2f}")
        if rule:
            bf16 = bf16_pays_on_cpu(B, d, f)
            r = statistics.median(ratio)
            picked[bf16].append(r)
            right = "even" if abs(r - 1) < 0.02 else "yes" if (r > 1) == bf16 else "no"
            line += f" {B * d * f / 2**20:>16.1f}M {'bf16' if bf16 else 'fp32':>8} {right:>8}"
        print(line)
    if rule:
        fp32, bf16 = picked[False], picked[True]
        print(f"rule: bf16 at >= {CPU_BF16_MIN_WORK / 2**20:.0f}M rows x d x d_sae ('even': within 2%). "
              f"Where it keeps fp32 ({len(fp32)} sizes) bf16 was at best {max(fp32, default=float('nan')):.2f}x; "
              f"where it picks bf16 ({len(bf16)} sizes) at worst {min(bf16, default=float('nan')):.2f}x "
              f"(median fp32 ms / bf16 ms over rounds)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    interleaved.add_arguments(ap, steps=600, stores_required=False)
    ap.add_argument("--sizes", action="store_true", help="part 1 over the grid of sizes with the default's size rule, "
                                                          "then stop (no store needed)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (speed)")
    ap.add_argument("--speed-steps", type=int, default=10, help="steps per round and setting (speed)")
    ap.add_argument("--shapes", default=None, help="speed shapes as d,d_sae,batch,k;... (default: toy to benchmark)")
    ap.add_argument("--archs", nargs="+", default=["batchtopk"], help="architectures of the quality part (JumpReLU "
                                                                      "at target L0 k)")
    a = ap.parse_args(argv)
    if not a.sizes and not (a.store and a.eval_store):
        ap.error("--store and --eval-store are needed for the quality part (or --sizes for the speed grid alone)")
    if a.sizes:
        print(f"# python benchmarks/autocast_cpu.py --sizes  ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, bf16 hardware: {cpu_has_bf16_hardware()})")
        print(f"## speed by size: saekit BatchTopK step, {a.rounds} interleaved rounds of {a.speed_steps} steps")
        speed(SIZES if a.shapes is None else _shapes(a.shapes), a.rounds, a.speed_steps, rule=True)
        return
    shapes = SHAPES if a.shapes is None else _shapes(a.shapes)
    print(f"# python benchmarks/autocast_cpu.py --store {a.store} --eval-store {a.eval_store} --steps {a.steps} "
          f"--seeds {' '.join(map(str, a.seeds))}  ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, bf16 hardware: {cpu_has_bf16_hardware()})")
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


def _shapes(text: str) -> list[tuple[int, ...]]:
    return [tuple(map(int, s.split(","))) for s in text.split(";")]


if __name__ == "__main__":
    main()
