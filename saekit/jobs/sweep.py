"""Sweeps: several architectures and sparsity levels trained on one activation stream, each
evaluated, collected in one pandas DataFrame (the reconstruction-sparsity frontier of the paper)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..activations import ActivationStore
from ..metrics import CE_TOKENS, evaluate_many
from ..plumbing.checks import hook_on_store
from ..plumbing.files import atomic_write_bytes, atomic_write_csv, atomic_write_json, refuse_overlap
from ..sae import SAEConfig, architecture
from ..train import TrainConfig, as_source, train

COLUMNS = [
    "name",
    "architecture",
    "k",
    "target_l0",
    "l0_coeff",
    "l1_coeff",
    "d_sae",
    "seed",
    "lr",
    "l0",
    "l0_batch_mode",
    "nmse",
    "mse_normalized",
    "fvu",
    "cosine",
    "ce_recovered",
    "ce_recovered_mean",
    "ce_delta",
    "kl",
    "dead_fraction",
    "dense_fraction",
    "train_tokens",
    "train_seconds",
    "eval_tokens",
    "ce_tokens",
]
# each gets _lo, _hi
INTERVAL_METRICS = ("nmse", "mse_normalized", "l0", "ce_recovered", "ce_recovered_mean", "kl")


def sweep_configs(
    d_in: int,
    archs: Sequence[str] = ("batchtopk", "topk", "jumprelu"),
    ks: Sequence[int] = (16, 32, 64),
    expansion: int = 8,
    l1_coeffs: Sequence[float] = (1.0, 3.0, 10.0),
    **common,
) -> list[SAEConfig]:
    """One config per (architecture, sparsity level): the levels of `ks` (k, or JumpReLU's target
    L0) or of `l1_coeffs` (ReLU-L1), as each architecture's `sweep_knob` says. All share d_sae =
    expansion * d_in."""
    cfgs = []
    for arch in archs:
        cls = architecture(arch)
        for level in l1_coeffs if cls.sweep_knob == "l1_coeff" else ks:
            cfgs.append(
                SAEConfig(
                    arch=arch,
                    d_in=d_in,
                    d_sae=d_in * expansion,
                    **{**common, **cls.sweep_setting(level)},
                )
            )
    return cfgs


def sweep(
    train_data,
    cfgs: Sequence[SAEConfig],
    train_cfg: TrainConfig,
    out: str | Path,
    eval_data=None,
    model=None,
    eval_tokens: int = 20_000,
    ce_tokens: int = CE_TOKENS,
    hook: str | None = None,
    progress: bool = True,
    reuse: bool = True,
    allow_mismatch: bool = False,
) -> pd.DataFrame:
    """Train every config on one stream (each batch read once), evaluate each on `eval_data` (a
    store or packed tokens; the downstream CE needs `model`), and save out/sweep.csv,
    out/sweep.parquet and one eval JSON per SAE. Resumes from out/checkpoints like train(); with
    reuse, a finished sweep of the same SAEs and token budget in `out` is loaded instead of
    recomputed. A held-out store is checked against the SAEs' hook and model before any training
    (saekit.plumbing.checks; allow_mismatch for a deliberate cross-use)."""
    out = Path(out)
    refuse_overlap(out, {"evaluation store": getattr(eval_data, "path", None)}, "sweep folder")
    if isinstance(eval_data, ActivationStore):
        for c in cfgs:
            hook_on_store(c, eval_data, hook, allow_mismatch)
    if reuse and (out / "sweep.csv").exists():
        done = load_sweep(out)
        budget = train_cfg.total_steps * train_cfg.batch_size
        if set(done["name"]) == {c.name for c in cfgs} and (done["train_tokens"] >= budget).all():
            return done
    t0 = time.perf_counter()
    res = train(as_source(train_data, hook), list(cfgs), train_cfg, out=out, hook=hook)
    train_seconds = time.perf_counter() - t0
    evals = evaluate_many(
        res.saes,
        model,
        eval_data if eval_data is not None else train_data,
        n_tokens=eval_tokens,
        ce_tokens=ce_tokens,
        hook=hook,
        progress=progress,
        error_splice=False,
        allow_mismatch=allow_mismatch,
    )
    rows = []
    for name, sae, m in zip(res.names, res.saes, evals):
        atomic_write_json(out / name / "eval.json", m)
        rows.append(sweep_row(name, sae, m, res.tokens, train_seconds, train_cfg))
    df = pd.DataFrame(rows)
    atomic_write_csv(out / "sweep.csv", df)
    atomic_write_bytes(out / "sweep.parquet", lambda fh: df.to_parquet(fh, index=False))
    return df


def sweep_row(
    name: str, sae, m: dict, train_tokens: int, train_seconds: float, train_cfg: TrainConfig
) -> dict:
    """One sweep-table row from an SAE and its evaluate() result: point values, then each interval
    as METRIC_lo / METRIC_hi (95% bootstrap over sequences)."""
    c = sae.cfg
    d = m["downstream"] or {}
    row = {
        "name": name,
        "architecture": c.arch,
        "k": m["sae"]["k"],
        "target_l0": c.target_l0,
        "l0_coeff": sae.sparsity_settings(c).get("l0_coeff"),
        "l1_coeff": m["sae"]["l1_coeff"],
        "d_sae": c.d_sae,
        "seed": train_cfg.seed,
        "lr": train_cfg.lr_for(c.d_sae),
        "l0": m["sparsity"]["l0"],
        "l0_batch_mode": m["sparsity"].get("l0_batch_mode"),
        **m["reconstruction"],
        **{k: d.get(k) for k in ("ce_recovered", "ce_recovered_mean", "ce_delta", "kl")},
        "dead_fraction": m["sparsity"]["dead_fraction"],
        "dense_fraction": m["sparsity"]["dense_fraction"],
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "eval_tokens": m["n_tokens"],
        "ce_tokens": d.get("n_tokens"),
    }
    row = {k: row.get(k) for k in COLUMNS}
    for k in INTERVAL_METRICS:
        lo, hi = (m.get("intervals") or {}).get(k, (None, None))
        row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
    return row


def load_sweep(path: str | Path) -> pd.DataFrame:
    """A sweep table from its folder, CSV or parquet file."""
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.parquet" if (path / "sweep.parquet").exists() else path / "sweep.csv"
    if not path.exists():
        raise FileNotFoundError(f"no sweep table at {path}; run `saekit sweep` first")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def prefix_table(sweep_dir: str | Path) -> pd.DataFrame:
    """Every Matryoshka SAE's nested prefixes from a sweep folder (its eval.json files): one row per
    (SAE, prefix) with width, NMSE, L0, CE recovered and KL. Empty when the sweep has no
    Matryoshka."""
    rows = []
    for ev in sorted(Path(sweep_dir).glob("*/eval.json")):
        m = json.loads(ev.read_text())
        for p in m.get("prefixes") or []:
            rows.append({"name": ev.parent.name, "k": m["sae"]["k"], **p})
    return pd.DataFrame(rows)


def committed_results(name: str = "smollm2_l15") -> pd.DataFrame:
    """The sweep table committed under results/NAME (shipped inside the package too), for the
    full-size picture next to a notebook's small sweep."""
    here = Path(__file__).resolve().parents[1]  # the saekit package
    for p in (
        here / "_data" / "results" / name / "sweep.csv",
        here.parent / "results" / name / "sweep.csv",
    ):
        if p.exists():
            return load_sweep(p)
    raise FileNotFoundError(
        f"no committed results named '{name}' in this install (looked for results/{name}/sweep.csv)"
    )
