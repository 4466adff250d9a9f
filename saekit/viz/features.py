"""Figures and HTML of one latent: its activations, density, logit effects and examples."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import arch_color


def activation_histogram_figure(
    values: np.ndarray, latent: int, density: float | None = None
) -> go.Figure:
    sub = f" (fires on {density:.2%} of tokens)" if density is not None else ""
    fig = go.Figure(
        go.Histogram(x=np.asarray(values), nbinsx=40, marker_color=arch_color("batchtopk"))
    )
    fig.update_layout(
        title=f"Latent {latent}: activation histogram{sub}",
        xaxis_title="activation",
        yaxis_title="tokens",
        template="plotly_white",
        height=300,
    )
    return fig


def density_histogram_figure(density: np.ndarray, latent: int | None = None) -> go.Figure:
    """log10 firing density over all latents, the dead ones counted apart and this latent marked."""
    density = np.asarray(density)
    alive = density[density > 0]
    fig = go.Figure(
        go.Histogram(x=np.log10(alive), nbinsx=40, marker_color="#7f7f7f", name="latents")
    )
    if latent is not None and density[latent] > 0:
        fig.add_vline(
            x=float(np.log10(density[latent])),
            line_color="#d62728",
            annotation_text=f"latent {latent}",
        )
    fig.update_layout(
        title=f"Firing density of all {len(density):,} latents "
        f"({int((density == 0).sum()):,} dead, not shown)",
        xaxis_title="log10 fraction of tokens a latent fires on",
        yaxis_title="latents",
        template="plotly_white",
        height=300,
    )
    return fig


def logit_effects_figure(effects: dict, latent: int) -> go.Figure:
    """A latent's logit effects: the tokens it promotes most and those it suppresses most, side by
    side, and the histogram of its effect on every token of the vocabulary (where `effects` has
    "all")."""
    up, down = effects["promoted"], effects["suppressed"]
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=["promoted", "suppressed", "all tokens"],
        horizontal_spacing=0.12,
    )
    fig.add_trace(
        go.Bar(
            y=[repr(t) for t, _ in up][::-1],
            x=[v for _, v in up][::-1],
            orientation="h",
            name="promoted",
            marker_color="#2ca02c",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            y=[repr(t) for t, _ in down][::-1],
            x=[v for _, v in down][::-1],
            orientation="h",
            name="suppressed",
            marker_color="#d62728",
        ),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Histogram(
            x=np.asarray(effects.get("all", [])),
            nbinsx=60,
            marker_color="#7f7f7f",
            name="vocabulary",
        ),
        row=1,
        col=3,
    )
    fig.update_xaxes(title_text="logit contribution", row=1, col=1)
    fig.update_xaxes(title_text="logit contribution", row=1, col=2)
    fig.update_xaxes(title_text="logit contribution", row=1, col=3)
    fig.update_yaxes(title_text="tokens", row=1, col=3)
    folded = " (final norm's gain folded in)" if effects.get("gain_folded") else ""
    fig.update_layout(
        title=f"Latent {latent}: logit effects of its decoder row through the unembedding{folded}",
        template="plotly_white",
        height=360,
        showlegend=False,
    )
    return fig


def examples_html(examples: list[dict], max_activation: float | None = None) -> str:
    """Examples as HTML: the firing token boxed, every token of the context shaded by the latent's
    activation on it (where the example carries "values"; hover a token for its value)."""
    import html as _html

    top = max_activation or max((e["activation"] for e in examples), default=1.0) or 1.0
    lines = []
    for e in examples:
        parts = []
        values = e.get("values") or [
            e["activation"] if i == e["focus"] else 0.0 for i in range(len(e["tokens"]))
        ]
        for i, (t, v) in enumerate(zip(e["tokens"], values)):
            s = _html.escape(t).replace("\n", "⏎")
            alpha = min(1.0, max(0.0, v / top))
            box = "border: 1px solid #d62728; border-radius: 3px; " if i == e["focus"] else ""
            if v or box:
                s = (
                    f'<span title="{v:.3f}" style="background: rgba(214,39,40,{alpha:.2f}); '
                    f'{box}">{s}</span>'
                )
            parts.append(s)
        lines.append(
            f'<div style="font-family: monospace; white-space: pre-wrap; margin: 2px 0">'
            f"<b>{e['activation']:.3f}</b>&nbsp;&nbsp;{''.join(parts)}</div>"
        )
    return "\n".join(lines) or "<i>this latent never fired on the indexed tokens</i>"


def quantile_groups_html(groups: list[dict], max_activation: float | None = None) -> str:
    """FeatureIndex.quantile_groups as HTML: each group headed by its activation range and its share
    of the latent's firings, then its examples shaded on one scale (the latent's top activation,
    where given)."""
    return "".join(
        f"<h5>activation {g['range'][0]:.3f}–{g['range'][1]:.3f} "
        f"&middot; {g['share']:.0%} of its firings</h5>"
        + examples_html(g["examples"], max_activation)
        for g in groups
    )


def token_shading_html(tokens, values, max_value: float | None = None) -> str:
    """A text with every token shaded by a value (e.g. one latent's activation); hovering a token
    shows it."""
    import html as _html

    top = max_value or max((float(v) for v in values), default=1.0) or 1.0
    parts = []
    for t, v in zip(tokens, values):
        s = _html.escape(t).replace("\n", "⏎")
        parts.append(
            f'<span title="{float(v):.3f}" style="background: '
            f'rgba(214,39,40,{min(1.0, max(0.0, float(v) / top)):.2f})">{s}</span>'
        )
    return f'<div style="font-family: monospace; white-space: pre-wrap">{"".join(parts)}</div>'


def causal_html(effect: dict) -> str:
    """analysis.causal_effect's result as a table: the next token's top changes, clean beside
    edited, and KL."""
    import html as _html

    rows = "".join(
        f"<tr><td>{_html.escape(r.token)}</td><td>{r.p_clean:.4f}</td><td>{r.p_edited:.4f}</td>"
        f"<td>{r.change:+.4f}</td></tr>"
        for r in effect["top"].itertuples()
    )
    fmt = lambda top: ", ".join(f"{_html.escape(t)!s} ({p:.3f})" for t, p in top)  # noqa: E731
    return (
        f"<b>{effect['edit']}</b> latent {effect['latent']} (it fired on "
        f"{effect['fired_on']} tokens, max {effect['max_activation']:.3f}): KL(clean ‖ "
        f"edited) of the next token {effect['kl_next']:.4f} nats, {effect['kl_mean']:.4f} "
        "nats averaged over the text<br>clean next tokens: "
        f"{fmt(effect['clean_top'])}<br>edited next tokens: "
        f"{fmt(effect['edited_top'])}<table><tr><th>token</th><th>p clean</th><th>p "
        f"edited</th><th>change</th></tr>{rows}</table>"
    )
