"""Is the default learning rate (saekit.train.default_lr: 8e-4 / sqrt(d_sae / 2^14)) close to the best one?

For toy superposition data (saekit.toy) and, with --store, SmolLM2 activations, at a few dictionary
sizes: a BatchTopK SAE trained with every other setting at its default, at the default lr times
1/4, 1/2, 1, 2 and 4. Printed per run: held-out NMSE as a ratio to the best of the sweep (1.00 = the
best), and for toy data the recovered ground-truth features (decoder cosine > 0.9) and the per-sample
correlation of L0 with the true number of active features. Then, on toy data at the default lr, the
same for --normalize token / dataset / none.

    python benchmarks/lr_default.py --store runs/cmp/store_train --eval-store runs/cmp/store_test
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from saekit.activations import ActivationStore
from saekit.metrics import reconstruction_metrics
from saekit.sae import SAEConfig
from saekit.toy import ToyData, feature_recovery, make_toy
from saekit.train import LR_BASE, TrainConfig, default_lr, train

FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def toy_run(data, held, d_sae, k, lr, steps, batch, normalize="token"):
    cfg = SAEConfig(arch="batchtopk", d_in=data.x.shape[1], d_sae=d_sae, k=k, normalize=normalize,
                    dead_tokens=5 * batch)
    res = train(data.x, cfg, TrainConfig(total_tokens=steps * batch, batch_size=batch, lr=lr, progress=False))
    sae = res.saes[0]
    m = reconstruction_metrics(sae, [held.x])
    l0 = m["_per_token_l0"].numpy()
    corr = float(np.corrcoef(l0, held.n_active.numpy())[0, 1])
    rec = feature_recovery(sae.W_dec.detach(), data.features)["recovered"]
    return {"nmse": m["nmse"], "l0": m["l0"], "recovered": rec, "l0_truth_corr": corr}


def store_run(store, held, d_sae, k, lr, steps, batch):
    cfg = SAEConfig(arch="batchtopk", d_in=store.d_model, d_sae=d_sae, k=k, dead_tokens=5 * batch)
    res = train(store, cfg, TrainConfig(total_tokens=steps * batch, batch_size=batch, lr=lr, warmup_steps=min(50, steps // 5),
                                        progress=False))
    m = reconstruction_metrics(res.saes[0], held.split(4096))
    return {"nmse": m["nmse"], "l0": m["l0"]}


def report(title, rows):
    best = min(r["nmse"] for r in rows)
    print(f"\n{title}")
    for r in rows:
        extra = "".join(f"  {k} {r[k]:.3f}" for k in ("recovered", "l0_truth_corr") if k in r)
        mark = "  <- default" if r["factor"] == 1.0 else ""
        print(f"  lr {r['lr']:.2e} (x{r['factor']:g}): NMSE {r['nmse']:.4f} = {r['nmse'] / best:.3f} x best, "
              f"L0 {r['l0']:.1f}{extra}{mark}")
    default = next(r for r in rows if r["factor"] == 1.0)
    print(f"  default / best NMSE: {default['nmse'] / best:.3f}")
    return default["nmse"] / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None, help="training activations (saekit capture); omit for toy data only")
    ap.add_argument("--eval-store", default=None, help="held-out activations")
    ap.add_argument("--toy-sizes", nargs="+", type=int, default=[192, 768])
    ap.add_argument("--store-sizes", nargs="+", type=int, default=[2304, 4608])
    ap.add_argument("--toy-steps", type=int, default=1000)
    ap.add_argument("--store-steps", type=int, default=300)
    ap.add_argument("--factors", nargs="+", type=float, default=list(FACTORS))
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"# lr_default: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; default_lr = {LR_BASE:g} / sqrt(d_sae / 2^14)")
    t0 = time.perf_counter()
    g = make_toy(n_samples=68_000, d=48, n_features=256, mean_active=5.0, seed=0)
    data = ToyData(g.x[:60_000], g.features, g.active[:60_000], g.coeffs[:60_000])  # training samples
    held = ToyData(g.x[60_000:], g.features, g.active[60_000:], g.coeffs[60_000:])  # held-out samples
    ratios = []
    for f in a.toy_sizes:
        rows = [{"factor": s, "lr": default_lr(f) * s, **toy_run(data, held, f, 5, default_lr(f) * s, a.toy_steps, 4096)}
                for s in a.factors]
        ratios.append(report(f"toy: d=48, 256 true features (~5 active), BatchTopK d_sae={f}, k=5, "
                             f"{a.toy_steps} steps of 4096", rows))
    if a.store:
        store, held_s = ActivationStore(a.store), ActivationStore(a.eval_store).load()[:20_000]
        for f in a.store_sizes:
            rows = [{"factor": s, "lr": default_lr(f) * s, **store_run(store, held_s, f, 32, default_lr(f) * s,
                                                                      a.store_steps, 1024)} for s in a.factors]
            ratios.append(report(f"{store.manifest['model']} {store.hook}: BatchTopK d_sae={f}, k=32, "
                                 f"{a.store_steps} steps of 1024, held-out {len(held_s):,} tokens", rows))
    print("\ntoy, default lr, by input normalisation (d_sae=192, k=5):")
    for norm in ("token", "dataset", "none"):
        r = toy_run(data, held, 192, 5, default_lr(192), a.toy_steps, 4096, normalize=norm)
        print(f"  --normalize {norm:8s} NMSE {r['nmse']:.4f}  recovered {r['recovered']:.3f}  "
              f"L0-truth corr {r['l0_truth_corr']:.3f}  L0 {r['l0']:.1f}")
    print(f"\ndefault / best NMSE over the settings: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"worst {max(ratios):.3f}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
