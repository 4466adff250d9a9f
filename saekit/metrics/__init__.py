"""Reconstruction, sparsity and downstream metrics, defined once and used everywhere, with 95%
bootstrap intervals.

Definitions (docs/numbers.md): NMSE = sum ||x - x_hat||^2 / sum ||x||^2; FVU = sum ||x - x_hat||^2 /
sum ||x - mean x||^2; mse_normalized = mean squared error per element in the SAE's normalised input
space (what the BatchTopK paper's code logs as its l2 loss); L0 = active latents per token; CE
recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean); KL(clean || spliced) per next-token
prediction. Intervals resample whole sequences (tokens of one sequence are not independent).

    intervals.py       statistics of per-sequence sums, bootstrap intervals, paired differences
    reconstruction.py  NMSE, FVU, cosine, L0 and its distribution, dead/dense latents
    downstream.py      the SAE spliced into the model: CE (clean, SAE, zero- and mean-ablated), KL
    evaluate.py        evaluate() / evaluate_many(): all of it as one JSON dict; describe() prints
    compare.py         two saved evaluations: paired only where made on the same data and hook
"""

from .compare import EvaluationError, compare_lines, mismatches, read_evaluation
from .downstream import CE_TOKENS, ce_metrics, ce_metrics_many, sample_sequences
from .evaluate import SCHEMA, describe, evaluate, evaluate_many
from .intervals import (
    CE_STATS,
    LEVEL,
    N_BOOT,
    RECON_STATS,
    STATISTICS,
    bootstrap_intervals,
    format_difference,
    paired_difference,
    resample_weights,
)
from .reconstruction import (
    DENSE_FRACTION,
    QUANTILES,
    cosine,
    fvu,
    l0_histogram,
    nmse,
    nmse_tensor,
    per_token_l0,
    public,
    reconstruction_metrics,
)

__all__ = [
    "EvaluationError",
    "compare_lines",
    "mismatches",
    "read_evaluation",
    "CE_TOKENS",
    "ce_metrics",
    "ce_metrics_many",
    "sample_sequences",
    "SCHEMA",
    "describe",
    "evaluate",
    "evaluate_many",
    "CE_STATS",
    "LEVEL",
    "N_BOOT",
    "RECON_STATS",
    "STATISTICS",
    "bootstrap_intervals",
    "format_difference",
    "paired_difference",
    "resample_weights",
    "DENSE_FRACTION",
    "QUANTILES",
    "cosine",
    "fvu",
    "l0_histogram",
    "nmse",
    "nmse_tensor",
    "per_token_l0",
    "public",
    "reconstruction_metrics",
]
