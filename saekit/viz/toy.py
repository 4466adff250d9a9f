"""Figures of superposition on toy data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def superposition_figure(
    table: pd.DataFrame, title: str = "Superposition: more features than dimensions"
) -> go.Figure:
    """From toy.superposition_table: interference against features per dimension (left), and what a
    linear read-out gets wrong for active and inactive features, one line per number of active
    features (right)."""
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=[
            "interference between feature directions",
            "reading features back by projection",
        ],
    )
    first = table.drop_duplicates("features_per_dim")
    fig.add_trace(
        go.Scatter(
            x=first["features_per_dim"],
            y=first["max_cosine"],
            mode="lines+markers",
            name="mean max |cosine|",
            line=dict(color="#555"),
        ),
        row=1,
        col=1,
    )
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, (m, g) in enumerate(table.groupby("active")):
        c = palette[i % len(palette)]
        fig.add_trace(
            go.Scatter(
                x=g["features_per_dim"],
                y=g["active_error"],
                mode="lines+markers",
                name=f"{m} active: error on active",
                line=dict(color=c),
            ),
            row=1,
            col=2,
        )
        fig.add_trace(
            go.Scatter(
                x=g["features_per_dim"],
                y=g["inactive_readout"],
                mode="lines+markers",
                name=f"{m} active: read-out of inactive",
                line=dict(color=c, dash="dot"),
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title_text="features per dimension", type="log")
    fig.update_yaxes(title_text="|cosine|", row=1, col=1)
    fig.update_yaxes(title_text="mean |error| (unit coefficients)", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=400)
    return fig


def cosine_histogram_figure(
    values: dict, title: str = "Each direction's largest |cosine| with another"
) -> go.Figure:
    """Overlaid histograms of toy.max_cosines for several sets of directions (true features,
    decoders, random)."""
    fig = go.Figure()
    for name, v in values.items():
        fig.add_trace(
            go.Histogram(
                x=np.asarray(v),
                name=name,
                opacity=0.6,
                histnorm="probability",
                xbins=dict(start=0, end=1, size=0.02),
            )
        )
    fig.update_layout(
        barmode="overlay",
        title=title,
        xaxis_title="largest |cosine| with another direction",
        yaxis_title="share of directions",
        template="plotly_white",
        height=360,
    )
    return fig
