"""Shared by the benchmarks that weigh a training setting against a baseline (auxk_every.py, autocast_cpu.py): one
Trainer per setting, the same initialisation and the same batches for all, the settings interleaved step by step
(machine drift hits them alike), then each SAE evaluated on the same held-out rows, so that the NMSE difference
against the baseline carries a paired 95% bootstrap interval over held-out sequences."""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from saekit.activations import open_store
from saekit.metrics import evaluate, format_difference, paired_difference
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer


# Student's t, 97.5% quantile, by degrees of freedom (a 95% interval over a few seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def add_arguments(ap: argparse.ArgumentParser, steps: int, stores_required: bool = True) -> None:
    ap.add_argument("--store", required=stores_required)
    ap.add_argument("--eval-store", required=stores_required)
    ap.add_argument("--hook", default=None)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])


def run(a, seed: int, settings: dict[str, tuple[dict, dict]]) -> dict:
    """settings: name -> (SAEConfig fields, TrainConfig fields) beyond the common ones; the first is the baseline.
    Returns per setting: training seconds (steps after the first two), dead fraction (mean over steps, at the end)
    and the held-out evaluation."""
    store = open_store(a.store, a.hook)
    g = torch.Generator().manual_seed(seed)
    n = a.batch * a.steps
    start = torch.randint(0, len(store) - n, (1,), generator=g).item() if len(store) > n else 0
    data = store.rows(start, start + n).float()
    data = data[torch.randperm(len(data), generator=g)]
    per_pass = len(data) // a.batch  # a store shorter than the run is read again (epochs), never a short batch
    if per_pass < 1:
        raise SystemExit(f"the store holds {len(data):,} rows, fewer than one batch of {a.batch}: lower --batch")
    trainers = {}
    for name, (sae_fields, train_fields) in settings.items():
        cfg = SAEConfig(**{"arch": "batchtopk", "d_in": store.d_model, "d_sae": a.expansion * store.d_model,
                           "k": a.k, "dead_tokens": 5 * a.batch, "hook_name": store.hook, **sae_fields})
        tc = TrainConfig(**{"total_tokens": n, "batch_size": a.batch, "lr": a.lr, "seed": seed, "warmup_steps": 10,
                            "progress": False, "log_every": 10**9, "device": "cpu", **train_fields})
        torch.manual_seed(seed)
        tr = Trainer([cfg], tc)
        tr.initialise(data[:a.batch * 16])
        trainers[name] = tr
    seconds = dict.fromkeys(settings, 0.0)
    dead_seen = {name: [] for name in settings}
    for s in range(a.steps):
        x = data[(s % per_pass) * a.batch:(s % per_pass + 1) * a.batch]
        for name, tr in trainers.items():
            t = time.perf_counter()
            tr.train_step(x)
            if s >= 2:
                seconds[name] += time.perf_counter() - t
            dead_seen[name].append(float(tr.saes[0].dead_mask().float().mean()))
    evals = {name: evaluate(tr.saes[0].eval(), None, a.eval_store, n_tokens=a.eval_tokens, hook=a.hook,
                            progress=False) for name, tr in trainers.items()}
    return {"seconds": seconds, "dead_mean": {e: float(np.mean(v)) for e, v in dead_seen.items()},
            "dead_end": {e: v[-1] for e, v in dead_seen.items()}, "evals": evals}


def print_seed(a, seed: int, r: dict, label: str) -> dict:
    """One row per setting: ms/step, speed-up over the baseline (the first setting), dead fractions, held-out NMSE
    and L0, and the paired NMSE difference against the baseline. Returns {setting: NMSE difference} (not the
    baseline), for over_seeds."""
    diffs = {}
    names = list(r["seconds"])
    base = names[0]
    for name in names:
        ms = 1000 * r["seconds"][name] / max(a.steps - 2, 1)
        rec = r["evals"][name]["reconstruction"]
        d = None if name == base else paired_difference(r["evals"][name], r["evals"][base], "nmse")
        diff = "" if d is None else format_difference(d, f"{label} {name}".strip(), f"{label} {base}".strip())
        if d is not None:
            diffs[name] = d["difference"]
        print(f"{seed:>4} {name:>9} {ms:>8.1f} {r['seconds'][base] / r['seconds'][name]:>8.2f}x "
              f"{r['dead_mean'][name]:>9.4f} {r['dead_end'][name]:>9.4f} {rec['nmse']:>8.4f} "
              f"{r['evals'][name]['sparsity']['l0']:>6.1f}   {diff}")
    return diffs


def over_seeds(per_seed: list[dict], label: str) -> None:
    """Each setting's NMSE difference against the baseline over the seeds: mean and a 95% t-interval (a seed is
    one sample: a different start and batch order moves a run as much as a setting may)."""
    for name in per_seed[0] if per_seed else []:
        v = np.array([d[name] for d in per_seed])
        if len(v) < 2:
            continue
        half = T975.get(len(v) - 1, 2.0) * v.std(ddof=1) / np.sqrt(len(v))
        verdict = "excludes zero" if abs(v.mean()) > half else "includes zero"
        f = lambda x: f"{x:+.4f}".replace("-", "−")
        print(f"{label} {name}: NMSE difference over {len(v)} seeds {f(v.mean())} [{f(v.mean() - half)}, "
              f"{f(v.mean() + half)}] (95% t-interval over seeds; {verdict})")


def header(label: str) -> str:
    return (f"{'seed':>4} {label:>9} {'ms/step':>8} {'speed-up':>9} {'dead mean':>9} {'dead end':>9} {'NMSE':>8} "
            f"{'L0':>6}   NMSE difference vs the first [95% interval]")
