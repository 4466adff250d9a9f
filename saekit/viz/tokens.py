"""Figures of per-token latent counts: how many latents each token takes, and what that follows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..sae import ARCHITECTURES
from .style import arch_color


def _token_label(t: str) -> str:
    return t.replace("\n", "⏎").replace(" ", "·") or "∅"


def token_counts_figure(
    tables: dict, width: int = 16, title: str = "Active latents per token", zmax: int | None = None
) -> go.Figure:
    """Text laid out in rows of `width` tokens, each cell shaded by its number of active latents,
    one panel per SAE (e.g. BatchTopK above TopK on the same text). Hover: count and top latents.
    tables: {name: DataFrame from analysis.latent_counts / count_table}."""
    names = list(tables)
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=names, vertical_spacing=0.08)
    # a fixed scale where the caller gives one
    zmax = zmax or max(int(t["count"].max()) for t in tables.values()) or 1
    for r, name in enumerate(names, start=1):
        t = tables[name]
        n = len(t)
        n_rows = -(-n // width)
        # gaps as null (NaN is not valid JSON in widget messages)
        z = np.full((n_rows, width), None, dtype=object)
        text = np.full((n_rows, width), "", dtype=object)
        hover = np.full((n_rows, width), "", dtype=object)
        for i, row in enumerate(t.itertuples()):
            y, x = divmod(i, width)
            z[y, x] = int(row.count) if row.kept else None
            text[y, x] = _token_label(row.token)
            tops = (
                ", ".join(f"#{j} {a:.2f}" for j, a in row.top_latents[:5])
                if row.kept
                else "(not encoded)"
            )
            hover[y, x] = f"{row.token!r}<br>{row.count} active latents<br>{tops}"
        fig.add_trace(
            go.Heatmap(
                z=z.tolist(),
                text=text,
                hovertext=hover,
                hoverinfo="text",
                texttemplate="%{text}",
                textfont=dict(size=11),
                colorscale="YlOrRd",
                zmin=0,
                zmax=zmax,
                xgap=2,
                ygap=2,
                showscale=(r == 1),
                colorbar=dict(title="latents"),
                name=name,
            ),
            row=r,
            col=1,
        )
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=r, col=1)
        fig.update_xaxes(showticklabels=False, row=r, col=1)
    rows_total = sum(-(-len(t) // width) for t in tables.values())
    fig.update_layout(
        title=title, template="plotly_white", height=120 + 34 * rows_total + 40 * len(names)
    )
    return fig


def l0_distribution_figure(
    per_token: dict, title: str = "Per-token L0", k: dict | int | None = None
) -> go.Figure:
    """Histograms of active latents per token, one panel per SAE side by side, each as a share of
    its tokens with its own y scale: TopK's spike at k cannot flatten BatchTopK's spread. `k` (one
    number, or one per SAE) draws a dashed line at the budget."""
    names = list(per_token) or [""]
    fig = make_subplots(
        rows=1,
        cols=len(names),
        subplot_titles=[
            f"{n} (mean {np.asarray(per_token[n]).mean():.1f})" if n in per_token else n
            for n in names
        ],
        horizontal_spacing=0.06,
    )
    for c, name in enumerate(names, start=1):
        if name not in per_token:
            continue
        v = np.asarray(per_token[name])
        fig.add_trace(
            go.Histogram(
                x=v,
                name=f"{name} (mean {v.mean():.1f})",
                histnorm="percent",
                marker_color=arch_color(
                    next(
                        (a for a in ARCHITECTURES if name.lower().replace(" ", "").startswith(a)),
                        None,
                    )
                ),
                xbins=dict(start=-0.5, end=float(v.max()) + 0.5, size=1),
                showlegend=False,
            ),
            row=1,
            col=c,
        )
        budget = k.get(name) if isinstance(k, dict) else k
        if budget:
            fig.add_vline(
                x=budget,
                line_dash="dash",
                line_color="#444",
                annotation_text=f"k = {budget}",
                row=1,
                col=c,
            )
        fig.update_xaxes(title_text="active latents per token", row=1, col=c)
    fig.update_yaxes(title_text="share of tokens (%)", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig


def group_counts_figure(
    table: pd.DataFrame, title: str = "Where each token's latents come from"
) -> go.Figure:
    """Matryoshka: stacked bars per token, one colour per nested group (from
    analysis.group_counts)."""
    t = table[table["kept"]]
    groups = [c for c in table.columns if c.startswith("g") and "(" in c]
    labels = [f"{i}:{_token_label(tok)}" for i, tok in zip(t["position"], t["token"])]
    fig = go.Figure()
    colours = px.colors.sample_colorscale(
        "Viridis", [i / max(1, len(groups) - 1) for i in range(len(groups))]
    )
    for g, colour in zip(groups, colours):
        fig.add_trace(go.Bar(x=labels, y=t[g], name=g, marker_color=colour))
    fig.update_layout(
        barmode="stack",
        title=title,
        xaxis_title="token",
        yaxis_title="active latents",
        template="plotly_white",
        height=380,
        legend_title="nested group",
    )
    return fig


PROPERTY_LABELS = {
    "position": "position",
    "token_frequency": "token frequency",
    "model_loss": "model loss",
    "recon_error": "recon. error",
    "norm": "activation norm",
}


def count_property_figure(
    props: pd.DataFrame,
    correlations: pd.Series | None = None,
    max_points: int = 3000,
    title: str = "What goes with more latents?",
) -> go.Figure:
    """Latent count against each token property, with the Spearman correlation in each panel
    title."""
    cols = [c for c in PROPERTY_LABELS if c in props]
    sample = props.sample(min(max_points, len(props)), random_state=0)
    titles = [
        f"{PROPERTY_LABELS[c]}<br>ρ = {correlations[c]:.2f}"
        if correlations is not None
        else PROPERTY_LABELS[c]
        for c in cols
    ]
    fig = make_subplots(rows=1, cols=len(cols), subplot_titles=titles, shared_yaxes=True)
    for i, c in enumerate(cols, start=1):
        fig.add_trace(
            go.Scattergl(
                x=sample[c],
                y=sample["count"],
                mode="markers",
                marker=dict(size=3, opacity=0.35),
                hovertext=sample["token"],
                showlegend=False,
                name=c,
            ),
            row=1,
            col=i,
        )
        if c in ("token_frequency", "recon_error"):
            fig.update_xaxes(type="log", row=1, col=i)
    fig.update_yaxes(title_text="active latents", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=360, margin=dict(t=110))
    fig.update_annotations(font_size=12)
    return fig


# -- features -----------------------------------------------------------------------------------


def count_vs_truth_figure(
    true_counts, counts: dict, title: str = "Latents used vs true active features"
) -> go.Figure:
    """Per-sample latent count against the true number of active features (toy data): mean and
    spread per true count, one line per SAE. BatchTopK follows the diagonal; TopK is flat at k."""
    true_counts = np.asarray(true_counts)
    fig = go.Figure()
    levels = np.unique(true_counts)
    fig.add_trace(
        go.Scatter(
            x=levels,
            y=levels,
            mode="lines",
            name="ideal (one latent per feature)",
            line=dict(color="#999", dash="dash"),
        )
    )
    for name, c in counts.items():
        c = np.asarray(c, dtype=float)
        means = [c[true_counts == v].mean() for v in levels]
        sds = [c[true_counts == v].std() for v in levels]
        arch = next((a for a in ARCHITECTURES if name.lower().startswith(a)), None)
        fig.add_trace(
            go.Scatter(
                x=levels,
                y=means,
                error_y=dict(type="data", array=sds, visible=True),
                mode="lines+markers",
                name=f"{name} (r={np.corrcoef(c, true_counts)[0, 1] if c.std() > 0 else 0:.2f})",
                line=dict(color=arch_color(arch)),
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="true number of active features",
        yaxis_title="active latents (mean ± sd)",
        template="plotly_white",
        height=420,
    )
    return fig
