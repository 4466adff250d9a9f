"""Figures of whole runs: the reconstruction-sparsity frontier, Matryoshka's prefixes, training
curves."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..sae import ARCHITECTURES
from .style import arch_color, arch_label


def _error_bars(g: pd.DataFrame, metric: str) -> dict | None:
    """plotly error_y from METRIC_lo / METRIC_hi columns (95% bootstrap intervals), where
    present."""
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    if lo not in g or g[lo].isna().all():
        return None
    return dict(
        type="data",
        symmetric=False,
        array=(g[hi] - g[metric]).tolist(),
        arrayminus=(g[metric] - g[lo]).tolist(),
        thickness=1.2,
        width=4,
    )


def frontier_figure(df: pd.DataFrame, title: str = "Reconstruction-sparsity frontier") -> go.Figure:
    """NMSE vs L0 and CE recovered vs L0, one line per architecture, with 95% bootstrap intervals as
    error bars where the table has them; hover shows the run. Several seeds of one setting (a "seed"
    column) are averaged into one point whose bars span the seeds' intervals."""
    has_ce = "ce_recovered" in df and df["ce_recovered"].notna().any()
    if "seed" in df and df["seed"].nunique() > 1:
        df = seed_means(df)
    fig = make_subplots(
        rows=1,
        cols=2 if has_ce else 1,
        horizontal_spacing=0.12,
        subplot_titles=["NMSE vs L0 (lower is better)"]
        + (["CE loss recovered vs L0 (higher is better)"] if has_ce else []),
    )
    for arch, g in df.sort_values("l0").groupby("architecture", sort=False):
        hover = [
            f"{r['name']}<br>L0 {r['l0']:.1f}<br>NMSE {r['nmse']:.4f}"
            + (
                f"<br>CE recovered {r['ce_recovered']:.4f}"
                if has_ce and pd.notna(r.get("ce_recovered"))
                else ""
            )
            + (f"<br>dead {r['dead_fraction']:.3f}" if "dead_fraction" in r else "")
            for _, r in g.iterrows()
        ]
        style = dict(
            mode="lines+markers",
            name=arch_label(arch),
            legendgroup=arch,
            line=dict(color=arch_color(arch)),
            marker=dict(size=9),
            hovertext=hover,
            hoverinfo="text",
            customdata=g["name"].tolist(),
        )
        fig.add_trace(
            go.Scatter(x=g["l0"], y=g["nmse"], error_y=_error_bars(g, "nmse"), **style),
            row=1,
            col=1,
        )
        if has_ce:
            fig.add_trace(
                go.Scatter(
                    x=g["l0"],
                    y=g["ce_recovered"],
                    showlegend=False,
                    error_y=_error_bars(g, "ce_recovered"),
                    **style,
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(title_text="L0 (mean active latents per token)", type="log")
    fig.update_yaxes(title_text="NMSE (sum of squared errors / sum of squared norms)", row=1, col=1)
    if has_ce:
        fig.update_yaxes(
            title_text="CE loss recovered (fraction of zero-ablation loss)", row=1, col=2
        )
    fig.update_layout(title=title, template="plotly_white", height=420, hovermode="closest")
    return fig


def seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (same name) over its seeds: mean of every number; the _lo / _hi columns
    become the lowest lo and the highest hi of the seeds (so a bar spans every seed's interval)."""
    num = df.select_dtypes("number").columns
    agg = {
        c: ("min" if c.endswith("_lo") else "max" if c.endswith("_hi") else "mean")
        for c in num
        if c != "seed"
    }
    agg.update({c: "first" for c in df.columns if c not in num and c != "name"})
    out = df.groupby("name", sort=False).agg(agg).reset_index()
    out["n_seeds"] = df.groupby("name", sort=False)["seed"].nunique().values
    return out


# ---------------------------------------------------------------------------------------------
# adaptive allocation


def prefix_figure(prefixes, title: str = "Matryoshka: each nested prefix on its own") -> go.Figure:
    """NMSE and CE recovered against prefix size, from evaluate()'s "prefixes" list (or a DataFrame
    of them, with an optional "name" column for several SAEs)."""
    df = pd.DataFrame(prefixes)
    if "name" not in df:
        df["name"] = "matryoshka"
    has_ce = "ce_recovered" in df and df["ce_recovered"].notna().any()
    fig = make_subplots(
        rows=1,
        cols=2 if has_ce else 1,
        subplot_titles=["NMSE vs prefix size"]
        + (["CE recovered vs prefix size"] if has_ce else []),
    )
    for name, d in df.groupby("name", sort=False):
        hover = [
            f"{name}<br>first {w:,} latents<br>L0 {l0:.1f}" for w, l0 in zip(d["width"], d["l0"])
        ]
        fig.add_trace(
            go.Scatter(
                x=d["width"],
                y=d["nmse"],
                mode="lines+markers",
                name=str(name),
                hovertext=hover,
                hoverinfo="text+y",
                legendgroup=str(name),
            ),
            row=1,
            col=1,
        )
        if has_ce:
            fig.add_trace(
                go.Scatter(
                    x=d["width"],
                    y=d["ce_recovered"],
                    mode="lines+markers",
                    name=str(name),
                    hovertext=hover,
                    hoverinfo="text+y",
                    legendgroup=str(name),
                    showlegend=False,
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(type="log", title_text="latents in the prefix")
    fig.update_yaxes(
        title_text="NMSE (squared error / squared norm, summed over tokens)", row=1, col=1
    )
    if has_ce:
        fig.update_yaxes(title_text="CE loss recovered (fraction)", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig


TRAINING_PANELS = (
    ("loss", "loss (log scale)"),
    ("nmse", "NMSE of the batch"),
    ("l0", "L0 (dashed: the target)"),
    ("dead_frac", "dead latents"),
)  # (train_log column, panel title)


def training_curves_figure(
    logs: dict, targets: dict | None = None, title: str = "Training", height: int = 340
) -> go.Figure:
    """The training log's panels (TRAINING_PANELS) against training tokens, the loss on a log scale
    and the target L0 dashed: for finished runs' train_log.csv, and (with no logs) the empty figure
    the live TrainingMonitor fills.
    logs: {name: DataFrame}; targets: {name: L0 aimed at}."""
    fig = make_subplots(rows=1, cols=4, subplot_titles=[t for _, t in TRAINING_PANELS])
    for name, log in logs.items():
        arch = next((a for a in ARCHITECTURES if name.lower().startswith(a)), None)
        color = arch_color(arch)
        for c, (key, _) in enumerate(TRAINING_PANELS, start=1):
            if key in log:
                fig.add_trace(
                    go.Scatter(
                        x=log["tokens"],
                        y=log[key],
                        mode="lines",
                        name=name,
                        legendgroup=name,
                        showlegend=(c == 1),
                        line=dict(color=color),
                    ),
                    row=1,
                    col=c,
                )
        if (targets or {}).get(name):
            fig.add_hline(y=targets[name], line_dash="dash", line_color=color, row=1, col=3)
    fig.update_xaxes(title_text="training tokens")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(title_text="active latents per token", row=1, col=3)
    fig.update_yaxes(title_text="fraction of latents", row=1, col=4)
    fig.update_layout(title=title, template="plotly_white", height=height, showlegend=True)
    return fig
