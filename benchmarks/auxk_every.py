"""AuxK amortised: run the dead-latent loss on one step in `aux_every` (weighted by aux_every, so its mean gradient
is unchanged) and see what it saves in time and what it costs in loss and dead latents.

Every setting trains the same BatchTopK SAE from the same initialisation on the same batches (one Trainer per
setting, the settings interleaved step by step so machine drift hits them alike; benchmarks/interleaved.py), then
each is evaluated on the same held-out rows; the NMSE differences against aux_every=1 carry 95% bootstrap
intervals over held-out sequences (paired: the same sequences for both).

    python benchmarks/auxk_every.py --store runs/smollm2_l15/store_train --eval-store runs/smollm2_l15/store_test \\
        --hook resid_post.15 --steps 600 --seeds 0 1
"""
from __future__ import annotations

import argparse
import platform

import torch

import interleaved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    interleaved.add_arguments(ap, steps=600)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 2, 4, 8])
    a = ap.parse_args(argv)
    if a.every[0] != 1:
        raise SystemExit("--every must start with 1 (the baseline)")
    print(f"# python benchmarks/auxk_every.py --store {a.store} --eval-store {a.eval_store} --steps {a.steps} "
          f"--seeds {' '.join(map(str, a.seeds))}  ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"d_sae = {a.expansion}x d_in, k={a.k}, batch {a.batch}, {a.steps} steps per setting, settings interleaved "
          f"step by step; held-out {a.eval_tokens:,} tokens")
    print(interleaved.header("aux_every"))
    diffs = []
    for seed in a.seeds:
        r = interleaved.run(a, seed, {str(e): ({"aux_every": e}, {}) for e in a.every})
        diffs.append(interleaved.print_seed(a, seed, r, "every"))
    interleaved.over_seeds(diffs, "aux_every")


if __name__ == "__main__":
    main()
