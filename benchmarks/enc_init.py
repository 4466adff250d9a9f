"""What the encoder's starting scale (SAEConfig.enc_init_norm) does to a BatchTopK SAE: several starts
trained in one run on the same batches (saekit's trainer, one stream), then evaluated by saekit's metrics
on held-out activations. The evidence behind the default ("paper": sqrt(2 d_in / d_sae), the norm the
BatchTopK paper's code draws); 1 is the unit-norm decoder transposed, sparsify starts at sqrt(1/3) ~0.58.

    python benchmarks/enc_init.py --store runs/smollm2_l15/store_train --eval-store runs/smollm2_l15/store_test \
        --hook resid_post.15 --steps 300

Printed per start: held-out NMSE (threshold mode) and its ratio to the default's in the same run, mean
L0, the share of latents "dead" over the AuxK window at the end of training (what AuxK then works on),
and the share that never fired on the held-out tokens.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from saekit.activations import ActivationStore
from saekit.cli import enc_init_norm_arg
from saekit.metrics import reconstruction_metrics
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, train


DEFAULT = SAEConfig().enc_init_norm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="training activations (saekit capture)")
    ap.add_argument("--eval-store", required=True, help="held-out activations")
    ap.add_argument("--hook", default=None)
    ap.add_argument("--starts", nargs="+", type=enc_init_norm_arg, default=["paper", 1.0, 0.58, 0.2],
                    help="encoder start norms: numbers or 'paper' (the default, always run: the baseline)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    a.starts = [DEFAULT] + [s for s in a.starts if s != DEFAULT]  # the default runs first: the baseline
    store = ActivationStore(a.store, a.hook)
    hook, d = store.hook, store.d_model
    cfgs = [SAEConfig(arch="batchtopk", d_in=d, d_sae=a.expansion * d, k=a.k, enc_init_norm=s,
                      dead_tokens=5 * a.batch) for s in a.starts]
    tc = TrainConfig(total_tokens=a.steps * a.batch, batch_size=a.batch, lr=a.lr, warmup_steps=min(50, a.steps // 5),
                     device="cpu" if not torch.cuda.is_available() else None)
    res = train(store, cfgs, tc, hook=hook)
    held = ActivationStore(a.eval_store, hook).load(hook)[: a.eval_tokens].float()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; d={d}, "
          f"d_sae={a.expansion * d}, k={a.k}, batch={a.batch}, {a.steps} steps ({a.steps * a.batch:,} tokens, "
          f"one stream for all starts), lr={a.lr}; held-out {len(held):,} tokens")
    print(f"{'start':<18}{'norm':>7}{'NMSE':>9}{'/default':>10}{'L0':>8}{'dead (AuxK window)':>20}{'never fired':>13}")
    base, out = None, {}
    for cfg, sae in zip(cfgs, res.saes):
        m = reconstruction_metrics(sae, held.split(4096))
        idle = float(sae.dead_mask().float().mean())  # over the AuxK window at the end of training
        base = base or m["nmse"]
        v = cfg.enc_init_norm
        label = ("paper's code" if v == "paper" else f"{v:g}") + (" (default)" if v == DEFAULT else "")
        print(f"{label:<18}{cfg.encoder_start_norm:>7.3f}{m['nmse']:>9.4f}{m['nmse'] / base:>9.3f}x"
              f"{m['l0']:>8.1f}{idle:>19.1%}{m['dead_fraction']:>13.1%}")
        out[label] = dict(start_norm=cfg.encoder_start_norm, nmse=m["nmse"], nmse_vs_default=m["nmse"] / base,
                          l0=m["l0"], dead_auxk_window=idle,
                          never_fired=m["dead_fraction"])
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
