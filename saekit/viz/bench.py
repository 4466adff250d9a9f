"""SAEBench results: absorption per letter, sparse-probing accuracy against k, and whether the
absorbed words take more latents. Each takes SAEBench output documents ({name: document})."""

from __future__ import annotations

import plotly.graph_objects as go

from .style import arch_color


def _arch(doc: dict) -> str | None:
    return doc["sae_cfg_dict"].get("saekit", {}).get("arch")


def absorption_by_letter_figure(docs: dict[str, dict], metric: str = "mean_absorption_fraction"):
    """One bar per letter and SAE: each letter's absorption (the letters each SAE kept)."""
    fig = go.Figure()
    for name, doc in docs.items():
        rows = doc["eval_result_details"]
        fig.add_bar(
            x=[r["first_letter"] for r in rows],
            y=[r[metric] for r in rows],
            name=name,
            marker_color=arch_color(_arch(doc)),
            customdata=[[r["num_probe_true_positives"], r["num_split_features"]] for r in rows],
            hovertemplate="%{x}: %{y:.3f}<br>%{customdata[0]} words found by the probe, "
            "%{customdata[1]} main latents<extra>" + name + "</extra>",
        )
    title = metric.replace("_", " ")
    fig.update_layout(
        barmode="group",
        title=f"First-letter absorption: {title} per letter",
        xaxis_title="first letter",
        yaxis_title=title,
        yaxis_range=[0, 1],
        height=380,
    )
    return fig


def probing_by_k_figure(docs: dict[str, dict]):
    """Sparse-probing test accuracy against k: each SAE's top-k latents, and the model's own top-k
    dimensions (dashed) and all its dimensions (dotted)."""
    fig = go.Figure()
    first = next(iter(docs.values()))["eval_result_metrics"]
    ks = sorted(int(key.split("_")[2]) for key in first["sae"] if key.startswith("sae_top_"))
    fig.add_scatter(
        x=ks,
        y=[first["llm"][f"llm_top_{k}_test_accuracy"] for k in ks],
        name="model, top-k dimensions",
        line={"dash": "dash", "color": "grey"},
    )
    fig.add_hline(
        y=first["llm"]["llm_test_accuracy"],
        line={"dash": "dot", "color": "grey"},
        annotation_text="model, all dimensions",
    )
    for name, doc in docs.items():
        sae = doc["eval_result_metrics"]["sae"]
        fig.add_scatter(
            x=ks,
            y=[sae[f"sae_top_{k}_test_accuracy"] for k in ks],
            name=name,
            mode="lines+markers",
            line={"color": arch_color(_arch(doc))},
        )
    fig.update_layout(
        title="Sparse probing: test accuracy with k latents (or k model dimensions)",
        xaxis={"title": "k", "type": "log", "tickvals": ks},
        yaxis_title="test accuracy (mean over tasks, then data sets)",
        height=380,
    )
    return fig


def absorbed_l0_figure(words, name: str = ""):
    """The latents each scored word takes (L0 at its token), absorbed words against the others."""
    fig = go.Figure()
    for absorbed, label in ((False, "not absorbed"), (True, "absorbed (fraction > 0)")):
        part = words[words["absorbed"] == absorbed]
        fig.add_box(
            y=part["l0"],
            name=f"{label} ({len(part)})",
            boxpoints="all",
            jitter=0.4,
            text=part["word"] + " (" + part["letter"] + ")",
            hovertemplate="%{text}: %{y} latents<extra></extra>",
        )
    fig.update_layout(
        title=f"Latents per word token{': ' + name if name else ''}",
        yaxis_title="active latents (L0) at the word's token",
        height=380,
        showlegend=False,
    )
    return fig
