"""AuxK amortised: run the dead-latent loss on one step in `aux_every` (weighted by aux_every, so its mean gradient
is unchanged) and see what it saves in time and what it costs in loss and dead latents.

Every setting trains the same BatchTopK SAE from the same initialisation on the same batches (one Trainer per
setting, the settings interleaved step by step so machine drift hits them alike), then each is evaluated on the
same held-out rows; the NMSE and dead-fraction differences against aux_every=1 carry 95% bootstrap intervals over
held-out sequences (paired: the same sequences for both).

    python benchmarks/auxk_every.py --store runs/smollm2_l15/store_train --eval-store runs/smollm2_l15/store_test \\
        --hook resid_post.15 --steps 600 --seeds 0 1
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from saekit.activations import open_store
from saekit.metrics import evaluate, format_difference, paired_difference
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer


def run(a, seed: int) -> dict:
    store = open_store(a.store, a.hook)
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, len(store) - a.batch * a.steps, (1,), generator=g).item() if len(store) > a.batch * a.steps else 0
    data = store.rows(start, start + a.batch * a.steps).float()
    data = data[torch.randperm(len(data), generator=g)]
    trainers = {}
    for every in a.every:
        cfg = SAEConfig(arch="batchtopk", d_in=store.d_model, d_sae=a.expansion * store.d_model, k=a.k,
                        dead_tokens=5 * a.batch, aux_every=every, hook_name=store.hook)
        tr = Trainer([cfg], TrainConfig(total_tokens=a.steps * a.batch, batch_size=a.batch, lr=a.lr, seed=seed,
                                        warmup_steps=10, progress=False, log_every=10**9, device="cpu"))
        torch.manual_seed(seed)
        tr.initialise(data[:a.batch * 16])
        trainers[every] = tr
    seconds = {e: 0.0 for e in a.every}
    dead_seen = {e: [] for e in a.every}
    for s in range(a.steps):
        x = data[s * a.batch:(s + 1) * a.batch]
        for every, tr in trainers.items():  # interleaved: the same machine state for every setting
            t = time.perf_counter()
            tr.train_step(x)
            if s >= 2:
                seconds[every] += time.perf_counter() - t
            dead_seen[every].append(float(tr.saes[0].dead_mask().float().mean()))
    evals = {e: evaluate(tr.saes[0].eval(), None, a.eval_store, n_tokens=a.eval_tokens, hook=a.hook, progress=False)
             for e, tr in trainers.items()}
    return {"seconds": seconds, "dead_mean": {e: float(np.mean(v)) for e, v in dead_seen.items()},
            "dead_end": {e: v[-1] for e, v in dead_seen.items()}, "evals": evals}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--eval-store", required=True)
    ap.add_argument("--hook", default=None)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = ap.parse_args(argv)
    if a.every[0] != 1:
        raise SystemExit("--every must start with 1 (the baseline)")
    torch.set_num_threads(torch.get_num_threads())
    print(f"# python benchmarks/auxk_every.py --store {a.store} --eval-store {a.eval_store} --steps {a.steps} "
          f"--seeds {' '.join(map(str, a.seeds))}  ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"d_sae = {a.expansion}x d_in, k={a.k}, batch {a.batch}, {a.steps} steps per setting, settings interleaved "
          f"step by step; held-out {a.eval_tokens:,} tokens")
    print(f"{'seed':>4} {'aux_every':>9} {'ms/step':>8} {'speed-up':>9} {'dead mean':>9} {'dead end':>9} "
          f"{'NMSE':>8}   NMSE difference vs aux_every=1 [95% interval]")
    for seed in a.seeds:
        r = run(a, seed)
        base = r["seconds"][1]
        for e in a.every:
            ms = 1000 * r["seconds"][e] / (a.steps - 2)
            nm = r["evals"][e]["reconstruction"]["nmse"]
            diff = "" if e == 1 else format_difference(paired_difference(r["evals"][e], r["evals"][1], "nmse"),
                                                     f"every {e}", "every 1")
            print(f"{seed:>4} {e:>9} {ms:>8.1f} {base / r['seconds'][e]:>8.2f}x {r['dead_mean'][e]:>9.4f} "
                  f"{r['dead_end'][e]:>9.4f} {nm:>8.4f}   {diff}")


if __name__ == "__main__":
    main()
