"""A sweep's (or several seeds' sweeps') tables and figures in a results folder: `saekit
sweep-report`.

OUT_DIR gets sweep.csv (every SAE of every sweep, with 95% bootstrap intervals), sweep.md, by_k.md
(each architecture at each k: mean ± std over seeds), differences.md (paired BatchTopK − TopK
differences per k and seed, each with its 95% interval), frontier_at_equal_l0.md (architectures
trained with an L0 penalty, interpolated to the L0 of each BatchTopK), frontier.html, and for
Matryoshka SAEs prefixes.csv / prefixes.md / prefixes.html. Titles come from the SAEs' own cfg.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..metrics import format_difference, paired_difference
from ..sae import ARCHITECTURES
from ..viz import frontier_figure, prefix_figure
from .sweep import load_sweep, prefix_table

TABLE_METRICS = ("l0", "nmse", "mse_normalized", "ce_recovered", "kl")


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    def fmt(v):
        if isinstance(v, str):
            return v
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, (int, np.integer)):
            return f"{int(v):,}"
        if v is None or pd.isna(v):
            return ""
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.{digits}f}"

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def collect(sweep_dirs) -> pd.DataFrame:
    """Every sweep's table in one frame, with the folder each row's eval.json is in."""
    frames = []
    for d in sweep_dirs:
        df = load_sweep(d)
        df["sweep_dir"] = str(d)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


SETTING_NAMES = {"k": "k", "target_l0": "target L0", "l0_coeff": "L0 coeff", "l1_coeff": "L1 coeff"}


def _setting(df: pd.DataFrame) -> pd.Series:
    """What a row's sparsity setting is called ("k=32", "target L0=32", "L1 coeff=5"): the first of
    the sparsity columns the row has (each architecture fills only its own; see
    SAE.sparsity_settings)."""

    def label(r):
        col = next((c for c in SETTING_NAMES if c in r and pd.notna(r[c])), None)
        if col is None:
            return r["name"]
        return f"{SETTING_NAMES[col]}={int(r[col]) if col == 'k' else format(r[col], 'g')}"

    return df.apply(label, axis=1)


def by_k(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (architecture, setting): mean ± std over seeds of L0, NMSE, MSE (normalised), CE
    recovered and KL, and how many seeds."""
    d = df.assign(setting=_setting(df)).sort_values("l0", kind="stable")
    rows = []
    for (arch, setting), g in d.groupby(["architecture", "setting"], sort=False):
        row = {
            "architecture": arch,
            "setting": setting,
            "seeds": g["seed"].nunique() if "seed" in g else 1,
        }
        for m in TABLE_METRICS:
            v = g[m].dropna()
            row[m] = (
                (f"{v.mean():.4f} ± {v.std():.4f}" if len(v) > 1 else f"{v.mean():.4f}")
                if len(v)
                else ""
            )
        rows.append(row)
    out = pd.DataFrame(rows)
    out["_order"] = out["architecture"].map(
        lambda a: list(ARCHITECTURES).index(a) if a in ARCHITECTURES else 99
    )
    return out.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def _eval(row) -> dict:
    return json.loads((Path(row["sweep_dir"]) / row["name"] / "eval.json").read_text())


def paired_differences(
    df: pd.DataFrame,
    a: str = "batchtopk",
    b: str | None = None,
    metrics=("nmse", "ce_recovered", "kl"),
) -> pd.DataFrame:
    """metric(a) − metric(b) for each sparsity level (k, or JumpReLU's target L0) and seed where
    both were trained on one stream and evaluated on the same sequences (the same sweep), with 95%
    bootstrap intervals. b=None: every other architecture in the table. Penalty-swept SAEs have
    no matching level (see at_equal_l0)."""
    df = df.assign(level=df["k"].where(df["k"].notna(), df["target_l0"]))
    others = [b] if b else [x for x in ARCHITECTURES if x != a and x in set(df["architecture"])]
    rows = []
    for other in others:
        both = df[df["architecture"].isin([a, other]) & df["level"].notna()]
        for (level, seed, _), g in both.groupby(["level", "seed", "sweep_dir"]):
            ra, rb = g[g["architecture"] == a], g[g["architecture"] == other]
            if ra.empty or rb.empty:
                continue
            ea, eb = _eval(ra.iloc[0]), _eval(rb.iloc[0])
            for m in metrics:
                if m in ("ce_recovered", "kl") and not (ea.get("per_sequence") or {}).get("ce"):
                    continue
                d = paired_difference(ea, eb, m)
                rows.append(
                    {
                        "b": other,
                        "k": int(level),
                        "seed": int(seed),
                        "metric": m,
                        "difference": d["difference"],
                        "lo": d["interval"][0],
                        "hi": d["interval"][1],
                        "excludes zero": d["excludes_zero"],
                        "text": format_difference(d, a, other),
                    }
                )
    return pd.DataFrame(rows)


def at_equal_l0(df: pd.DataFrame, reference: str = "batchtopk") -> pd.DataFrame:
    """Settings swept by a penalty (JumpReLU's L0 coefficient, ReLU's L1) interpolated, linearly in
    log L0, to the L0 of each reference run (mean over its seeds): NMSE and CE recovered side by
    side."""
    ref = df[(df["architecture"] == reference)].groupby("k")[["l0", "nmse", "ce_recovered"]].mean()
    rows = []
    penal = (
        df[df["l0_coeff"].notna() | (df["architecture"] == "relu")]
        if "l0_coeff" in df
        else df[df["architecture"] == "relu"]
    )
    for arch, g in penal.groupby("architecture"):
        g = g.groupby("name")[["l0", "nmse", "ce_recovered"]].mean().sort_values("l0")
        if len(g) < 2:
            continue
        x = np.log(g["l0"].to_numpy())
        for k, r in ref.iterrows():
            inside = x.min() <= np.log(r["l0"]) <= x.max()

            def interp(col, r=r, x=x, g=g, inside=inside):
                return (
                    float(np.interp(np.log(r["l0"]), x, g[col].to_numpy()))
                    if inside
                    else float("nan")
                )

            rows.append(
                {
                    "k": int(k),
                    "L0": r["l0"],
                    f"NMSE {reference}": r["nmse"],
                    f"NMSE {arch} (interp.)": interp("nmse"),
                    f"CE rec. {reference}": r["ce_recovered"],
                    f"CE rec. {arch} (interp.)": interp("ce_recovered"),
                    "within the swept L0 range": inside,
                }
            )
    return pd.DataFrame(rows)


def title_of(df: pd.DataFrame) -> str:
    """'MODEL HOOK: arch vs arch' from the first SAE's own config."""
    cfg = json.loads((Path(df.iloc[0]["sweep_dir"]) / df.iloc[0]["name"] / "cfg.json").read_text())[
        "metadata"
    ]
    archs = [a for a in ARCHITECTURES if a in set(df["architecture"])]
    return f"{cfg.get('model_name') or 'model'} {cfg.get('hook_name') or ''}: {' vs '.join(archs)}"


def write_report(sweep_dirs, out_dir, title: str | None = None) -> dict[str, pd.DataFrame]:
    """Write every table and figure of one or several (e.g. one per seed) sweep folders into
    out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = collect([Path(d) for d in sweep_dirs])
    title = title or title_of(df)
    df.drop(columns="sweep_dir").to_csv(out / "sweep.csv", index=False)
    frontier_figure(df, title=title).write_html(
        out / "frontier.html", include_plotlyjs=True, full_html=True
    )
    cols = [
        c
        for c in [
            "name",
            "seed",
            "l0",
            "nmse",
            "nmse_lo",
            "nmse_hi",
            "mse_normalized",
            "ce_recovered",
            "ce_recovered_lo",
            "ce_recovered_hi",
            "kl",
            "dead_fraction",
        ]
        if c in df
    ]
    tables = {
        "sweep": df[cols],
        "by_k": by_k(df),
        "differences": paired_differences(df),
        "at_equal_l0": at_equal_l0(df),
    }
    (out / "sweep.md").write_text(markdown(df[cols]))
    (out / "by_k.md").write_text(markdown(tables["by_k"]))
    if len(tables["differences"]):
        (out / "differences.md").write_text(
            markdown(tables["differences"].drop(columns="text"))
            + "\n"
            + "\n".join(f"- {t}" for t in tables["differences"]["text"])
            + "\n"
        )
    if len(tables["at_equal_l0"]):
        (out / "frontier_at_equal_l0.md").write_text(markdown(tables["at_equal_l0"]))
    prefixes = prefix_table(df["sweep_dir"].iloc[0])
    if len(prefixes):
        prefixes.to_csv(out / "prefixes.csv", index=False)
        pcols = [
            c
            for c in ["name", "groups", "width", "l0", "nmse", "ce_recovered", "kl"]
            if c in prefixes
        ]
        (out / "prefixes.md").write_text(markdown(prefixes[pcols]))
        prefix_figure(
            prefixes, title="Matryoshka BatchTopK: each nested prefix on its own"
        ).write_html(out / "prefixes.html", include_plotlyjs=True, full_html=True)
        tables["prefixes"] = prefixes[pcols]
    return tables
