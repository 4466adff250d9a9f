"""Plotly figures. Each function takes plain data (DataFrames, metric dicts) and returns a Figure."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

ARCH_COLORS = {"batchtopk": "#d62728", "topk": "#1f77b4", "jumprelu": "#2ca02c", "relu": "#9467bd",
               "matryoshka": "#ff7f0e"}
ARCH_LABELS = {"batchtopk": "BatchTopK", "topk": "TopK", "jumprelu": "JumpReLU", "relu": "ReLU-L1",
               "matryoshka": "Matryoshka BatchTopK"}


def frontier_figure(df: pd.DataFrame, title: str = "Reconstruction-sparsity frontier") -> go.Figure:
    """NMSE vs L0 and CE recovered vs L0, one line per architecture; hover shows the run."""
    has_ce = "ce_recovered" in df and df["ce_recovered"].notna().any()
    fig = make_subplots(rows=1, cols=2 if has_ce else 1, horizontal_spacing=0.12,
                        subplot_titles=["NMSE vs L0 (lower is better)"] + (["CE loss recovered vs L0 (higher is better)"] if has_ce else []))
    for arch, g in df.sort_values("l0").groupby("architecture", sort=False):
        hover = [f"{r['name']}<br>L0 {r['l0']:.1f}<br>NMSE {r['nmse']:.4f}"
                 + (f"<br>CE recovered {r['ce_recovered']:.4f}" if has_ce and pd.notna(r.get("ce_recovered")) else "")
                 + (f"<br>dead {r['dead_fraction']:.3f}" if "dead_fraction" in r else "") for _, r in g.iterrows()]
        style = dict(mode="lines+markers", name=ARCH_LABELS.get(arch, arch), legendgroup=arch,
                     line=dict(color=ARCH_COLORS.get(arch)), marker=dict(size=9), hovertext=hover,
                     hoverinfo="text", customdata=g["name"].tolist())
        fig.add_trace(go.Scatter(x=g["l0"], y=g["nmse"], **style), row=1, col=1)
        if has_ce:
            fig.add_trace(go.Scatter(x=g["l0"], y=g["ce_recovered"], showlegend=False, **style), row=1, col=2)
    fig.update_xaxes(title_text="L0 (mean active latents per token)", type="log")
    fig.update_yaxes(title_text="NMSE", row=1, col=1)
    if has_ce:
        fig.update_yaxes(title_text="CE loss recovered", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=420, hovermode="closest")
    return fig
