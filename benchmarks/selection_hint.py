"""How good a hint is for BatchTopK's candidate search, over a real training run: at every step, how many
pre-activations pass the hint, as a multiple of the B*k the selection keeps. The selection first keeps the
entries above the hint and runs top-k among those only (kernels.batch_topk, batch_topk_static); it needs at
least B*k of them (below 1.0 a second pass over the whole batch follows) and, without read-backs, at most
`candidate_capacity` x B*k (above that the step is redone). Two hints, each at several factors: theta (the
running mean of the cuts) and the previous step's cut, both as they stand before the step.

    python benchmarks/selection_hint.py --store runs/smollm2_l15/store_train --hook resid_post.15 --steps 300
"""
from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from saekit.activations import open_store
from saekit.sae import SAEConfig
from saekit.sae.architectures import BatchTopKSAE
from saekit.train import TrainConfig, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--hook", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--factors", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    a = ap.parse_args(argv)
    store = open_store(a.store, a.hook)
    seen = {(hint, f): [] for hint in ("theta", "previous cut") for f in a.factors}
    original = BatchTopKSAE.train_select

    def spy(self, pre):
        flat, n = pre.reshape(-1), pre.shape[0] * self.cfg.k
        if self.previous_cut is not None:  # from step 1 on (theta and the previous cut are both set then)
            for (hint, f), got in seen.items():
                base = float(self.threshold) if hint == "theta" else self.previous_cut
                got.append(int(torch.count_nonzero(flat > base * f)) / n)
        return original(self, pre)

    BatchTopKSAE.train_select = spy
    try:
        cfg = SAEConfig(arch="batchtopk", d_in=store.d_model, d_sae=a.d_sae, k=a.k, hook_name=store.hook)
        train(store, cfg, TrainConfig(total_tokens=a.steps * a.batch, batch_size=a.batch, progress=False,
                                      calibrate_batches=0, device="cpu"))
    finally:
        BatchTopKSAE.train_select = original
    cap = BatchTopKSAE.candidate_capacity
    print(f"BatchTopK candidate hints over a {a.steps}-step run ({store.hook}, d={store.d_model}, d_sae={a.d_sae}, "
          f"k={a.k}, B={a.batch}; {platform.processor() or platform.machine()}, torch {torch.__version__})")
    print("entries above the hint / B*k, at steps 1..end; < 1: a second pass needed; "
          f"> {cap}: more than the sync-free selection holds (the step is redone)")
    print(f"{'hint':<14}{'factor':>7}{'min':>7}{'median':>8}{'max':>7}{'steps < 1':>11}{f'> {cap}':>7}"
          f"{'last third < 1':>16}")
    for (hint, f), got in seen.items():
        r = np.array(got)
        late = r[2 * len(r) // 3:]
        print(f"{hint:<14}{f:>7.2f}{r.min():>7.2f}{np.median(r):>8.2f}{r.max():>7.2f}{int((r < 1).sum()):>7} / {len(r)}"
              f"{int((r > cap).sum()):>7}{int((late < 1).sum()):>9} / {len(late)}")


if __name__ == "__main__":
    main()
