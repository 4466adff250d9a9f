"""One table over several SAEs' bench results, with 95% bootstrap intervals: absorption resamples
letters and then words within each letter; sparse probing resamples test documents (a document's
contexts stay together); CE loss score resamples sequences (saekit's own interval)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..metrics.intervals import LEVEL, N_BOOT, resample_weights

ALPHA = (1 - LEVEL) / 2


def _quantiles(values) -> list[float]:
    lo, hi = np.nanquantile(np.asarray(values, dtype=np.float64), [ALPHA, 1 - ALPHA])
    return [float(lo), float(hi)]


def absorption_boot(doc: dict, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Bootstrap draws of the mean absorption fraction over the letters kept: letters resampled,
    then each drawn letter's words."""
    kept = [d["first_letter"] for d in doc["eval_result_details"]]
    words = pd.DataFrame(doc["eval_result_unstructured"]["words"])
    per_letter = [
        words.loc[words["letter"] == c, "absorption_fraction"].to_numpy() if len(words) else []
        for c in kept
    ]
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        letters = rng.integers(0, len(per_letter), len(per_letter))
        means = [
            rng.choice(per_letter[i], len(per_letter[i])).mean() if len(per_letter[i]) else 0.0
            for i in letters
        ]
        draws[b] = np.mean(means)
    return draws


def probing_boot(doc: dict, probe: str = "sae_top_1", n_boot: int = N_BOOT, seed: int = 0):
    """Bootstrap draws of a probe's accuracy averaged as SAEBench averages it (over a data set's
    tasks, then over data sets), resampling test documents."""
    tasks = doc["eval_result_unstructured"]["tasks"]
    all_docs = sorted({d for t in tasks.values() for d in t["per_document"][probe]["doc"]})
    column = {d: i for i, d in enumerate(all_docs)}
    weights = resample_weights(len(all_docs), n_boot, seed)
    by_dataset: dict[str, list[np.ndarray]] = {}
    for t in tasks.values():
        counts = t["per_document"][probe]
        cols = [column[d] for d in counts["doc"]]
        w = weights[:, cols]
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = (w @ np.asarray(counts["right"], float)) / (w @ np.asarray(counts["n"], float))
        by_dataset.setdefault(t["dataset"], []).append(acc)
    return np.nanmean([np.nanmean(v, axis=0) for v in by_dataset.values()], axis=0)


def summary_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per SAE ({name: {eval: SAEBench document}}): the headline figure of each evaluation
    that ran, with its [lo, hi] where it has one."""
    rows = []
    for name, docs in results.items():
        any_doc = next(iter(docs.values()))
        cfg = any_doc["sae_cfg_dict"]
        own = cfg.get("saekit", {})  # saekit's own config, beside SAELens's (which names BatchTopK
        # as the JumpReLU it is stored as)
        row = {
            "sae": name,
            "architecture": own.get("arch", cfg.get("architecture")),
            "d_sae": cfg.get("d_sae"),
        }
        if "core" in docs:
            m = docs["core"]["eval_result_metrics"]
            row["l0"] = m["sparsity"]["l0"]
            row["explained_variance"] = m["reconstruction_quality"]["explained_variance"]
            row["ce_loss_score"] = m["model_performance_preservation"]["ce_loss_score"]
            ci = docs["core"]["eval_result_unstructured"]["saekit"]["ce_recovered_intervals"]
            row["ce_loss_score_ci"] = ci
            row["kl_div_score"] = m["model_behavior_preservation"]["kl_div_score"]
        if "absorption" in docs:
            m = docs["absorption"]["eval_result_metrics"]["mean"]
            row["absorption"] = m["mean_absorption_fraction_score"]
            row["absorption_ci"] = _quantiles(absorption_boot(docs["absorption"]))
            row["full_absorption"] = m["mean_full_absorption_score"]
            row["split_features"] = m["mean_num_split_features"]
        if "sparse-probing" in docs:
            m = docs["sparse-probing"]["eval_result_metrics"]
            row["llm_top_1"] = m["llm"]["llm_top_1_test_accuracy"]
            row["sae_top_1"] = m["sae"]["sae_top_1_test_accuracy"]
            row["sae_top_1_ci"] = _quantiles(probing_boot(docs["sparse-probing"]))
            row["sae_top_5"] = m["sae"]["sae_top_5_test_accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    """The summary as text: each figure with its interval beside it."""
    shown = pd.DataFrame({"sae": table["sae"], "arch": table["architecture"]})
    for column in table.columns:
        if column in ("sae", "architecture", "d_sae") or column.endswith("_ci"):
            continue
        ci = table.get(f"{column}_ci")
        shown[column] = [
            f"{v:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if ci is not None and c else "")
            for v, c in zip(table[column], ci if ci is not None else [None] * len(table))
        ]
    return shown.to_string(index=False)
