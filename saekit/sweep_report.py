"""Write a sweep's tables and figures into a results folder: python -m saekit.sweep_report SWEEP_DIR OUT_DIR

OUT_DIR gets sweep.csv (every SAE), sweep.md (the same as markdown), by_k.md (the architectures side by
side at each k), frontier.html (NMSE and CE recovered vs L0), and for Matryoshka SAEs prefixes.csv /
prefixes.md / prefixes.html (each nested prefix evaluated on its own).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd

from .sweep import load_sweep, prefix_table
from .viz import frontier_figure, prefix_figure

ARCH_ORDER = ["batchtopk", "topk", "jumprelu", "matryoshka", "relu"]


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    def fmt(v):
        if isinstance(v, str):
            return v
        if pd.isna(v):
            return ""
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.{digits}f}"

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def by_k(df: pd.DataFrame) -> pd.DataFrame:
    """One row per k (JumpReLU by its target L0): L0, NMSE, CE recovered and KL of each architecture."""
    d = df.copy()
    d["k_or_target"] = d["k"].where(d["architecture"] != "jumprelu", d["target_l0"])
    archs = [a for a in ARCH_ORDER if a in set(d["architecture"])]
    rows = []
    for k, g in d.groupby("k_or_target"):
        row = {"k": int(k)}
        for metric in ("l0", "nmse", "ce_recovered", "kl"):
            for a in archs:
                v = g.loc[g["architecture"] == a, metric]
                row[f"{metric} {a}"] = float(v.iloc[0]) if len(v) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def main(sweep_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load_sweep(sweep_dir)
    shutil.copy(Path(sweep_dir) / "sweep.csv", out / "sweep.csv")
    archs = [a for a in ARCH_ORDER if a in set(df["architecture"])]
    frontier_figure(df, title=f"SmolLM2-135M resid_post.15: {' vs '.join(archs)}").write_html(
        out / "frontier.html", include_plotlyjs=True, full_html=True)
    cols = ["name", "l0", "nmse", "fvu", "ce_recovered", "ce_delta", "kl", "dead_fraction"]
    (out / "sweep.md").write_text(markdown(df[cols]))
    table = by_k(df)
    (out / "by_k.md").write_text(markdown(table))
    print(df[cols].to_string(index=False))
    print(table.to_string(index=False))
    prefixes = prefix_table(sweep_dir)
    if len(prefixes):
        prefixes.to_csv(out / "prefixes.csv", index=False)
        pcols = ["name", "groups", "width", "l0", "nmse", "ce_recovered", "kl"]
        (out / "prefixes.md").write_text(markdown(prefixes[[c for c in pcols if c in prefixes]]))
        prefix_figure(prefixes, title="Matryoshka BatchTopK: each nested prefix on its own").write_html(
            out / "prefixes.html", include_plotlyjs=True, full_html=True)
        print(prefixes[[c for c in pcols if c in prefixes]].to_string(index=False))


if __name__ == "__main__":
    main(*sys.argv[1:3])
