"""Plotly figures. Each function takes plain data (DataFrames, metric dicts) and returns a Figure
(or HTML).

style.py     each architecture's label and colour in every figure
runs.py      the frontier, Matryoshka's prefixes, training curves
tokens.py    per-token latent counts and what they follow
features.py  one latent: histograms, logit effects, examples and their shading
toy.py       superposition on toy data
bench.py     SAEBench results: absorption per letter, probing against k, L0 of absorbed words
"""

from __future__ import annotations

from .bench import absorbed_l0_figure, absorption_by_letter_figure, probing_by_k_figure
from .features import (
    activation_histogram_figure,
    causal_html,
    density_histogram_figure,
    examples_html,
    logit_effects_figure,
    quantile_groups_html,
    token_shading_html,
)
from .runs import (
    TRAINING_PANELS,
    frontier_figure,
    prefix_figure,
    seed_means,
    training_curves_figure,
)
from .style import arch_color, arch_label
from .tokens import (
    PROPERTY_LABELS,
    count_property_figure,
    count_vs_truth_figure,
    group_counts_figure,
    l0_distribution_figure,
    token_counts_figure,
)
from .toy import cosine_histogram_figure, superposition_figure

__all__ = [
    "absorbed_l0_figure",
    "absorption_by_letter_figure",
    "probing_by_k_figure",
    "PROPERTY_LABELS",
    "TRAINING_PANELS",
    "activation_histogram_figure",
    "arch_color",
    "arch_label",
    "causal_html",
    "cosine_histogram_figure",
    "count_property_figure",
    "count_vs_truth_figure",
    "density_histogram_figure",
    "examples_html",
    "frontier_figure",
    "group_counts_figure",
    "l0_distribution_figure",
    "logit_effects_figure",
    "prefix_figure",
    "quantile_groups_html",
    "seed_means",
    "superposition_figure",
    "token_counts_figure",
    "token_shading_html",
    "training_curves_figure",
]
