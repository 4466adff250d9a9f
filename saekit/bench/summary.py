"""One table over several SAEs' bench results, with 95% bootstrap intervals: absorption resamples
letters and then words within each letter; sparse probing resamples test documents (a document's
contexts stay together); CE loss score resamples sequences (saekit's own interval)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..metrics.intervals import LEVEL, N_BOOT, resample_weights

ALPHA = (1 - LEVEL) / 2


def interval(values) -> list[float]:
    """The 95% percentile interval of bootstrap draws."""
    lo, hi = np.nanquantile(np.asarray(values, dtype=np.float64), [ALPHA, 1 - ALPHA])
    return [float(lo), float(hi)]


def _word_fractions(doc: dict, letters: list[str]) -> list[np.ndarray]:
    """Each letter's words' absorption fractions, in the order the words were scored."""
    words = pd.DataFrame(doc["eval_result_unstructured"]["words"])
    if words.empty:
        return [np.zeros(0) for _ in letters]
    return [words.loc[words["letter"] == c, "absorption_fraction"].to_numpy() for c in letters]


def absorption_boot(
    doc: dict, other: dict | None = None, n_boot: int = N_BOOT, seed: int = 0
) -> np.ndarray:
    """Bootstrap draws of the mean absorption fraction over the letters kept: letters resampled,
    then each drawn letter's words. With `other` (an SAE scored on the same words), draws of the
    paired difference doc - other, both resampled alike, over the letters both kept."""
    kept = [d["first_letter"] for d in doc["eval_result_details"]]
    if other is not None:
        theirs = {d["first_letter"] for d in other["eval_result_details"]}
        kept = [c for c in kept if c in theirs]
    mine = _word_fractions(doc, kept)
    paired = _word_fractions(other, kept) if other is not None else [np.zeros(len(v)) for v in mine]
    if any(len(a) != len(b) for a, b in zip(mine, paired)):
        raise ValueError("a paired absorption difference needs both SAEs scored on the same words")
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        means = []
        for i in rng.integers(0, len(kept), len(kept)):
            words = rng.integers(0, len(mine[i]), len(mine[i]))
            means.append((mine[i][words] - paired[i][words]).mean() if len(words) else 0.0)
        draws[b] = np.mean(means)
    return draws


def probing_boot(
    doc: dict, other: dict | None = None, probe: str = "sae_top_1", n_boot: int = N_BOOT, seed=0
):
    """Bootstrap draws of a probe's accuracy averaged as SAEBench averages it (over a data set's
    tasks, then over data sets), resampling test documents; with `other` (an SAE probed on the
    same contexts), draws of the paired difference doc - other."""
    if other is not None:
        a = probing_boot(doc, None, probe, n_boot, seed)
        return a - probing_boot(other, None, probe, n_boot, seed)  # same documents, same draws
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


def absorption_difference(doc: dict, other: dict) -> tuple[float, list[float], np.ndarray]:
    """Mean absorption fraction of `doc` minus `other`'s over the letters both kept, its paired
    95% interval, and the bootstrap draws behind it (to average over seeds)."""
    theirs = {d["first_letter"]: d for d in other["eval_result_details"]}
    pairs = [
        d["mean_absorption_fraction"] - theirs[d["first_letter"]]["mean_absorption_fraction"]
        for d in doc["eval_result_details"]
        if d["first_letter"] in theirs
    ]
    draws = absorption_boot(doc, other)
    return float(np.mean(pairs)), interval(draws), draws


def probing_difference(
    doc: dict, other: dict, probe: str = "sae_top_1"
) -> tuple[float, list, np.ndarray]:
    """A probe's accuracy for `doc` minus `other`'s, its paired 95% interval, and the bootstrap
    draws behind it (to average over seeds)."""
    key = f"{probe}_test_accuracy"
    point = doc["eval_result_metrics"]["sae"][key] - other["eval_result_metrics"]["sae"][key]
    draws = probing_boot(doc, other, probe)
    return float(point), interval(draws), draws


def absorbed_l0(doc: dict, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Do the words an SAE absorbs take more latents? Mean L0 of the scored words with an
    absorption fraction above 0 minus that of the others, with a 95% bootstrap interval over
    words, and the words themselves."""
    words = pd.DataFrame(doc["eval_result_unstructured"]["words"])
    words["absorbed"] = words["absorption_fraction"] > 0
    yes = words.loc[words["absorbed"], "l0"].to_numpy(float)
    no = words.loc[~words["absorbed"], "l0"].to_numpy(float)
    if len(yes) < 2 or len(no) < 2:
        return {"difference": float("nan"), "interval": [float("nan")] * 2, "words": words}
    rng = np.random.default_rng(seed)
    draws = [
        rng.choice(yes, len(yes)).mean() - rng.choice(no, len(no)).mean() for _ in range(n_boot)
    ]
    return {"difference": yes.mean() - no.mean(), "interval": interval(draws), "words": words}


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
            row["absorption_ci"] = interval(absorption_boot(docs["absorption"]))
            row["full_absorption"] = m["mean_full_absorption_score"]
            row["split_features"] = m["mean_num_split_features"]
        if "sparse-probing" in docs:
            m = docs["sparse-probing"]["eval_result_metrics"]
            row["llm_top_1"] = m["llm"]["llm_top_1_test_accuracy"]
            row["sae_top_1"] = m["sae"]["sae_top_1_test_accuracy"]
            row["sae_top_1_ci"] = interval(probing_boot(docs["sparse-probing"]))
            row["sae_top_5"] = m["sae"]["sae_top_5_test_accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The summary with each figure as text and its interval beside it."""
    shown = pd.DataFrame({"sae": table["sae"], "arch": table["architecture"]})
    for column in table.columns:
        if column in ("sae", "architecture", "d_sae") or column.endswith("_ci"):
            continue
        ci = table[f"{column}_ci"] if f"{column}_ci" in table else [None] * len(table)
        shown[column] = [
            f"{v:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c is not None else "")
            for v, c in zip(table[column], ci)
        ]
    return shown


def format_table(table: pd.DataFrame) -> str:
    """The summary as text, for the terminal."""
    return formatted(table).to_string(index=False)
