"""Plotly figures. Each function takes plain data (DataFrames, metric dicts) and returns a Figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .sae import ARCHITECTURES

def arch_label(arch: str) -> str:
    """The architecture's name for people (a fact of its class), or the name itself if unknown."""
    cls = ARCHITECTURES.get(arch)
    return cls.label if cls else arch


def arch_color(arch: str | None) -> str | None:
    """The architecture's colour in every figure (a fact of its class)."""
    cls = ARCHITECTURES.get(arch)
    return cls.color if cls else None


def _error_bars(g: pd.DataFrame, metric: str) -> dict | None:
    """plotly error_y from METRIC_lo / METRIC_hi columns (95% bootstrap intervals), where present."""
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    if lo not in g or g[lo].isna().all():
        return None
    return dict(type="data", symmetric=False, array=(g[hi] - g[metric]).tolist(),
                arrayminus=(g[metric] - g[lo]).tolist(), thickness=1.2, width=4)


def frontier_figure(df: pd.DataFrame, title: str = "Reconstruction-sparsity frontier") -> go.Figure:
    """NMSE vs L0 and CE recovered vs L0, one line per architecture, with 95% bootstrap intervals as
    error bars where the table has them; hover shows the run. Several seeds of one setting (a "seed"
    column) are averaged into one point whose bars span the seeds' intervals."""
    has_ce = "ce_recovered" in df and df["ce_recovered"].notna().any()
    if "seed" in df and df["seed"].nunique() > 1:
        df = seed_means(df)
    fig = make_subplots(rows=1, cols=2 if has_ce else 1, horizontal_spacing=0.12,
                        subplot_titles=["NMSE vs L0 (lower is better)"] + (["CE loss recovered vs L0 (higher is better)"] if has_ce else []))
    for arch, g in df.sort_values("l0").groupby("architecture", sort=False):
        hover = [f"{r['name']}<br>L0 {r['l0']:.1f}<br>NMSE {r['nmse']:.4f}"
                 + (f"<br>CE recovered {r['ce_recovered']:.4f}" if has_ce and pd.notna(r.get("ce_recovered")) else "")
                 + (f"<br>dead {r['dead_fraction']:.3f}" if "dead_fraction" in r else "") for _, r in g.iterrows()]
        style = dict(mode="lines+markers", name=arch_label(arch), legendgroup=arch,
                     line=dict(color=arch_color(arch)), marker=dict(size=9), hovertext=hover,
                     hoverinfo="text", customdata=g["name"].tolist())
        fig.add_trace(go.Scatter(x=g["l0"], y=g["nmse"], error_y=_error_bars(g, "nmse"), **style), row=1, col=1)
        if has_ce:
            fig.add_trace(go.Scatter(x=g["l0"], y=g["ce_recovered"], showlegend=False,
                                     error_y=_error_bars(g, "ce_recovered"), **style), row=1, col=2)
    fig.update_xaxes(title_text="L0 (mean active latents per token)", type="log")
    fig.update_yaxes(title_text="NMSE (sum of squared errors / sum of squared norms)", row=1, col=1)
    if has_ce:
        fig.update_yaxes(title_text="CE loss recovered (fraction of zero-ablation loss)", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=420, hovermode="closest")
    return fig


def seed_means(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (same name) over its seeds: mean of every number; the _lo / _hi columns
    become the lowest lo and the highest hi of the seeds (so a bar spans every seed's interval)."""
    num = df.select_dtypes("number").columns
    agg = {c: ("min" if c.endswith("_lo") else "max" if c.endswith("_hi") else "mean") for c in num if c != "seed"}
    agg.update({c: "first" for c in df.columns if c not in num and c != "name"})
    out = df.groupby("name", sort=False).agg(agg).reset_index()
    out["n_seeds"] = df.groupby("name", sort=False)["seed"].nunique().values
    return out


# ---------------------------------------------------------------------------------------------
# adaptive allocation


def _token_label(t: str) -> str:
    return t.replace("\n", "⏎").replace(" ", "·") or "∅"


def token_counts_figure(tables: dict, width: int = 16, title: str = "Active latents per token",
                        zmax: int | None = None) -> go.Figure:
    """Text laid out in rows of `width` tokens, each cell shaded by its number of active latents,
    one panel per SAE (e.g. BatchTopK above TopK on the same text). Hover: count and top latents.
    tables: {name: DataFrame from analysis.latent_counts / count_table}."""
    names = list(tables)
    fig = make_subplots(rows=len(names), cols=1, subplot_titles=names, vertical_spacing=0.08)
    zmax = zmax or max(int(t["count"].max()) for t in tables.values()) or 1  # a fixed scale where the caller gives one
    for r, name in enumerate(names, start=1):
        t = tables[name]
        n = len(t)
        n_rows = -(-n // width)
        z = np.full((n_rows, width), None, dtype=object)  # gaps as null (NaN is not valid JSON in widget messages)
        text = np.full((n_rows, width), "", dtype=object)
        hover = np.full((n_rows, width), "", dtype=object)
        for i, row in enumerate(t.itertuples()):
            y, x = divmod(i, width)
            z[y, x] = int(row.count) if row.kept else None
            text[y, x] = _token_label(row.token)
            tops = ", ".join(f"#{j} {a:.2f}" for j, a in row.top_latents[:5]) if row.kept else "(not encoded)"
            hover[y, x] = f"{row.token!r}<br>{row.count} active latents<br>{tops}"
        fig.add_trace(go.Heatmap(z=z.tolist(), text=text, hovertext=hover, hoverinfo="text", texttemplate="%{text}",
                                 textfont=dict(size=11), colorscale="YlOrRd", zmin=0, zmax=zmax, xgap=2, ygap=2,
                                 showscale=(r == 1), colorbar=dict(title="latents"), name=name), row=r, col=1)
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=r, col=1)
        fig.update_xaxes(showticklabels=False, row=r, col=1)
    rows_total = sum(-(-len(t) // width) for t in tables.values())
    fig.update_layout(title=title, template="plotly_white", height=120 + 34 * rows_total + 40 * len(names))
    return fig


def l0_distribution_figure(per_token: dict, title: str = "Per-token L0", k: dict | int | None = None) -> go.Figure:
    """Histograms of active latents per token, one panel per SAE side by side, each as a share of its tokens with
    its own y scale: TopK's spike at k cannot flatten BatchTopK's spread. `k` (one number, or one per SAE) draws a
    dashed line at the budget."""
    names = list(per_token) or [""]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[
        f"{n} (mean {np.asarray(per_token[n]).mean():.1f})" if n in per_token else n for n in names],
        horizontal_spacing=0.06)
    for c, name in enumerate(names, start=1):
        if name not in per_token:
            continue
        v = np.asarray(per_token[name])
        fig.add_trace(go.Histogram(x=v, name=f"{name} (mean {v.mean():.1f})", histnorm="percent",
                                   marker_color=arch_color(next((a for a in ARCHITECTURES if name.lower()
                                                                 .replace(" ", "").startswith(a)), None)),
                                   xbins=dict(start=-0.5, end=float(v.max()) + 0.5, size=1), showlegend=False),
                      row=1, col=c)
        budget = k.get(name) if isinstance(k, dict) else k
        if budget:
            fig.add_vline(x=budget, line_dash="dash", line_color="#444", annotation_text=f"k = {budget}",
                          row=1, col=c)
        fig.update_xaxes(title_text="active latents per token", row=1, col=c)
    fig.update_yaxes(title_text="share of tokens (%)", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig


def group_counts_figure(table: pd.DataFrame, title: str = "Where each token's latents come from") -> go.Figure:
    """Matryoshka: stacked bars per token, one colour per nested group (from analysis.group_counts)."""
    t = table[table["kept"]]
    groups = [c for c in table.columns if c.startswith("g") and "(" in c]
    labels = [f"{i}:{_token_label(tok)}" for i, tok in zip(t["position"], t["token"])]
    fig = go.Figure()
    colours = px.colors.sample_colorscale("Viridis", [i / max(1, len(groups) - 1) for i in range(len(groups))])
    for g, colour in zip(groups, colours):
        fig.add_trace(go.Bar(x=labels, y=t[g], name=g, marker_color=colour))
    fig.update_layout(barmode="stack", title=title, xaxis_title="token", yaxis_title="active latents",
                      template="plotly_white", height=380, legend_title="nested group")
    return fig


def prefix_figure(prefixes, title: str = "Matryoshka: each nested prefix on its own") -> go.Figure:
    """NMSE and CE recovered against prefix size, from evaluate()'s "prefixes" list (or a DataFrame of
    them, with an optional "name" column for several SAEs)."""
    df = pd.DataFrame(prefixes)
    if "name" not in df:
        df["name"] = "matryoshka"
    has_ce = "ce_recovered" in df and df["ce_recovered"].notna().any()
    fig = make_subplots(rows=1, cols=2 if has_ce else 1,
                        subplot_titles=["NMSE vs prefix size"] + (["CE recovered vs prefix size"] if has_ce else []))
    for name, d in df.groupby("name", sort=False):
        hover = [f"{name}<br>first {w:,} latents<br>L0 {l0:.1f}" for w, l0 in zip(d["width"], d["l0"])]
        fig.add_trace(go.Scatter(x=d["width"], y=d["nmse"], mode="lines+markers", name=str(name), hovertext=hover,
                                 hoverinfo="text+y", legendgroup=str(name)), row=1, col=1)
        if has_ce:
            fig.add_trace(go.Scatter(x=d["width"], y=d["ce_recovered"], mode="lines+markers", name=str(name),
                                     hovertext=hover, hoverinfo="text+y", legendgroup=str(name), showlegend=False),
                          row=1, col=2)
    fig.update_xaxes(type="log", title_text="latents in the prefix")
    fig.update_yaxes(title_text="NMSE (squared error / squared norm, summed over tokens)", row=1, col=1)
    if has_ce:
        fig.update_yaxes(title_text="CE loss recovered (fraction)", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig


PROPERTY_LABELS = {"position": "position", "token_frequency": "token frequency", "model_loss": "model loss",
                   "recon_error": "recon. error", "norm": "activation norm"}


def count_property_figure(props: pd.DataFrame, correlations: pd.Series | None = None, max_points: int = 3000,
                          title: str = "What goes with more latents?") -> go.Figure:
    """Latent count against each token property, with the Spearman correlation in each panel title."""
    cols = [c for c in PROPERTY_LABELS if c in props]
    sample = props.sample(min(max_points, len(props)), random_state=0)
    titles = [f"{PROPERTY_LABELS[c]}<br>ρ = {correlations[c]:.2f}" if correlations is not None else PROPERTY_LABELS[c]
              for c in cols]
    fig = make_subplots(rows=1, cols=len(cols), subplot_titles=titles, shared_yaxes=True)
    for i, c in enumerate(cols, start=1):
        fig.add_trace(go.Scattergl(x=sample[c], y=sample["count"], mode="markers", marker=dict(size=3, opacity=0.35),
                                   hovertext=sample["token"], showlegend=False, name=c), row=1, col=i)
        if c in ("token_frequency", "recon_error"):
            fig.update_xaxes(type="log", row=1, col=i)
    fig.update_yaxes(title_text="active latents", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=360, margin=dict(t=110))
    fig.update_annotations(font_size=12)
    return fig


# ---------------------------------------------------------------------------------------------
# features


def activation_histogram_figure(values: np.ndarray, latent: int, density: float | None = None) -> go.Figure:
    sub = f" (fires on {density:.2%} of tokens)" if density is not None else ""
    fig = go.Figure(go.Histogram(x=np.asarray(values), nbinsx=40, marker_color=arch_color("batchtopk")))
    fig.update_layout(title=f"Latent {latent}: activation histogram{sub}", xaxis_title="activation",
                      yaxis_title="tokens", template="plotly_white", height=300)
    return fig


def density_histogram_figure(density: np.ndarray, latent: int | None = None) -> go.Figure:
    """log10 firing density over all latents, the dead ones counted apart and this latent marked."""
    density = np.asarray(density)
    alive = density[density > 0]
    fig = go.Figure(go.Histogram(x=np.log10(alive), nbinsx=40, marker_color="#7f7f7f", name="latents"))
    if latent is not None and density[latent] > 0:
        fig.add_vline(x=float(np.log10(density[latent])), line_color="#d62728",
                      annotation_text=f"latent {latent}")
    fig.update_layout(title=f"Firing density of all {len(density):,} latents ({int((density == 0).sum()):,} dead, "
                            f"not shown)", xaxis_title="log10 fraction of tokens a latent fires on",
                      yaxis_title="latents", template="plotly_white", height=300)
    return fig


def logit_effects_figure(effects: dict, latent: int) -> go.Figure:
    """A latent's logit effects: the tokens it promotes most and those it suppresses most, side by side, and the
    histogram of its effect on every token of the vocabulary (where `effects` has "all")."""
    up, down = effects["promoted"], effects["suppressed"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=["promoted", "suppressed", "all tokens"], horizontal_spacing=0.12)
    fig.add_trace(go.Bar(y=[repr(t) for t, _ in up][::-1], x=[v for _, v in up][::-1], orientation="h",
                         name="promoted", marker_color="#2ca02c"), row=1, col=1)
    fig.add_trace(go.Bar(y=[repr(t) for t, _ in down][::-1], x=[v for _, v in down][::-1], orientation="h",
                         name="suppressed", marker_color="#d62728"), row=1, col=2)
    fig.add_trace(go.Histogram(x=np.asarray(effects.get("all", [])), nbinsx=60, marker_color="#7f7f7f",
                               name="vocabulary"), row=1, col=3)
    fig.update_xaxes(title_text="logit contribution", row=1, col=1)
    fig.update_xaxes(title_text="logit contribution", row=1, col=2)
    fig.update_xaxes(title_text="logit contribution", row=1, col=3)
    fig.update_yaxes(title_text="tokens", row=1, col=3)
    folded = " (final norm's gain folded in)" if effects.get("gain_folded") else ""
    fig.update_layout(title=f"Latent {latent}: logit effects of its decoder row through the unembedding{folded}",
                      template="plotly_white", height=360, showlegend=False)
    return fig


def examples_html(examples: list[dict], max_activation: float | None = None) -> str:
    """Examples as HTML: the firing token boxed, every token of the context shaded by the latent's activation
    on it (where the example carries "values"; hover a token for its value)."""
    import html as _html

    top = max_activation or max((e["activation"] for e in examples), default=1.0) or 1.0
    lines = []
    for e in examples:
        parts = []
        values = e.get("values") or [e["activation"] if i == e["focus"] else 0.0 for i in range(len(e["tokens"]))]
        for i, (t, v) in enumerate(zip(e["tokens"], values)):
            s = _html.escape(t).replace("\n", "⏎")
            alpha = min(1.0, max(0.0, v / top))
            box = "border: 1px solid #d62728; border-radius: 3px; " if i == e["focus"] else ""
            if v or box:
                s = f'<span title="{v:.3f}" style="background: rgba(214,39,40,{alpha:.2f}); {box}">{s}</span>'
            parts.append(s)
        lines.append(f'<div style="font-family: monospace; white-space: pre-wrap; margin: 2px 0">'
                     f'<b>{e["activation"]:.3f}</b>&nbsp;&nbsp;{"".join(parts)}</div>')
    return "\n".join(lines) or "<i>this latent never fired on the indexed tokens</i>"


def quantile_groups_html(groups: list[dict], max_activation: float | None = None) -> str:
    """FeatureIndex.quantile_groups as HTML: each group headed by its activation range and its share of the
    latent's firings, then its examples shaded on one scale (the latent's top activation, where given)."""
    return "".join(f"<h5>activation {g['range'][0]:.3f}–{g['range'][1]:.3f} &middot; {g['share']:.0%} of its "
                   f"firings</h5>" + examples_html(g["examples"], max_activation) for g in groups)


def token_shading_html(tokens, values, max_value: float | None = None) -> str:
    """A text with every token shaded by a value (e.g. one latent's activation); hovering a token shows it."""
    import html as _html

    top = max_value or max((float(v) for v in values), default=1.0) or 1.0
    parts = []
    for t, v in zip(tokens, values):
        s = _html.escape(t).replace("\n", "⏎")
        parts.append(f'<span title="{float(v):.3f}" style="background: rgba(214,39,40,{min(1.0, max(0.0, float(v) / top)):.2f})">'
                     f'{s}</span>')
    return f'<div style="font-family: monospace; white-space: pre-wrap">{"".join(parts)}</div>'


def causal_html(effect: dict) -> str:
    """analysis.causal_effect's result as a table: the next token's top changes, clean beside edited, and KL."""
    import html as _html

    rows = "".join(f"<tr><td>{_html.escape(r.token)}</td><td>{r.p_clean:.4f}</td><td>{r.p_edited:.4f}</td>"
                   f"<td>{r.change:+.4f}</td></tr>" for r in effect["top"].itertuples())
    fmt = lambda top: ", ".join(f"{_html.escape(t)!s} ({p:.3f})" for t, p in top)  # noqa: E731
    return (f"<b>{effect['edit']}</b> latent {effect['latent']} (it fired on {effect['fired_on']} tokens, max "
            f"{effect['max_activation']:.3f}): KL(clean ‖ edited) of the next token {effect['kl_next']:.4f} nats, "
            f"{effect['kl_mean']:.4f} nats averaged over the text<br>clean next tokens: {fmt(effect['clean_top'])}"
            f"<br>edited next tokens: {fmt(effect['edited_top'])}<table><tr><th>token</th><th>p clean</th>"
            f"<th>p edited</th><th>change</th></tr>{rows}</table>")


def count_vs_truth_figure(true_counts, counts: dict, title: str = "Latents used vs true active features") -> go.Figure:
    """Per-sample latent count against the true number of active features (toy data): mean and
    spread per true count, one line per SAE. BatchTopK follows the diagonal; TopK is flat at k."""
    true_counts = np.asarray(true_counts)
    fig = go.Figure()
    levels = np.unique(true_counts)
    fig.add_trace(go.Scatter(x=levels, y=levels, mode="lines", name="ideal (one latent per feature)",
                             line=dict(color="#999", dash="dash")))
    for name, c in counts.items():
        c = np.asarray(c, dtype=float)
        means = [c[true_counts == v].mean() for v in levels]
        sds = [c[true_counts == v].std() for v in levels]
        arch = next((a for a in ARCHITECTURES if name.lower().startswith(a)), None)
        fig.add_trace(go.Scatter(x=levels, y=means, error_y=dict(type="data", array=sds, visible=True),
                                 mode="lines+markers", name=f"{name} (r={np.corrcoef(c, true_counts)[0, 1] if c.std() > 0 else 0:.2f})",
                                 line=dict(color=arch_color(arch))))
    fig.update_layout(title=title, xaxis_title="true number of active features",
                      yaxis_title="active latents (mean ± sd)", template="plotly_white", height=420)
    return fig


def superposition_figure(table: pd.DataFrame, title: str = "Superposition: more features than dimensions") -> go.Figure:
    """From toy.superposition_table: interference against features per dimension (left), and what a linear
    read-out gets wrong for active and inactive features, one line per number of active features (right)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["interference between feature directions",
                                                        "reading features back by projection"])
    first = table.drop_duplicates("features_per_dim")
    fig.add_trace(go.Scatter(x=first["features_per_dim"], y=first["max_cosine"], mode="lines+markers",
                             name="mean max |cosine|", line=dict(color="#555")), row=1, col=1)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, (m, g) in enumerate(table.groupby("active")):
        c = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=g["features_per_dim"], y=g["active_error"], mode="lines+markers",
                                 name=f"{m} active: error on active", line=dict(color=c)), row=1, col=2)
        fig.add_trace(go.Scatter(x=g["features_per_dim"], y=g["inactive_readout"], mode="lines+markers",
                                 name=f"{m} active: read-out of inactive", line=dict(color=c, dash="dot")), row=1, col=2)
    fig.update_xaxes(title_text="features per dimension", type="log")
    fig.update_yaxes(title_text="|cosine|", row=1, col=1)
    fig.update_yaxes(title_text="mean |error| (unit coefficients)", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=400)
    return fig


def cosine_histogram_figure(values: dict, title: str = "Each direction's largest |cosine| with another") -> go.Figure:
    """Overlaid histograms of toy.max_cosines for several sets of directions (true features, decoders, random)."""
    fig = go.Figure()
    for name, v in values.items():
        fig.add_trace(go.Histogram(x=np.asarray(v), name=name, opacity=0.6, histnorm="probability",
                                   xbins=dict(start=0, end=1, size=0.02)))
    fig.update_layout(barmode="overlay", title=title, xaxis_title="largest |cosine| with another direction",
                      yaxis_title="share of directions", template="plotly_white", height=360)
    return fig


TRAINING_PANELS = (("loss", "loss (log scale)"), ("nmse", "NMSE of the batch"), ("l0", "L0 (dashed: the target)"),
                   ("dead_frac", "dead latents"))  # (train_log column, panel title)


def training_curves_figure(logs: dict, targets: dict | None = None, title: str = "Training",
                           height: int = 340) -> go.Figure:
    """The training log's panels (TRAINING_PANELS) against training tokens, the loss on a log scale and the target
    L0 dashed: for finished runs' train_log.csv, and (with no logs) the empty figure the live TrainingMonitor fills.
    logs: {name: DataFrame}; targets: {name: L0 aimed at}."""
    fig = make_subplots(rows=1, cols=4, subplot_titles=[t for _, t in TRAINING_PANELS])
    for name, log in logs.items():
        arch = next((a for a in ARCHITECTURES if name.lower().startswith(a)), None)
        color = arch_color(arch)
        for c, (key, _) in enumerate(TRAINING_PANELS, start=1):
            if key in log:
                fig.add_trace(go.Scatter(x=log["tokens"], y=log[key], mode="lines", name=name, legendgroup=name,
                                         showlegend=(c == 1), line=dict(color=color)), row=1, col=c)
        if (targets or {}).get(name):
            fig.add_hline(y=targets[name], line_dash="dash", line_color=color, row=1, col=3)
    fig.update_xaxes(title_text="training tokens")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(title_text="active latents per token", row=1, col=3)
    fig.update_yaxes(title_text="fraction of latents", row=1, col=4)
    fig.update_layout(title=title, template="plotly_white", height=height, showlegend=True)
    return fig
