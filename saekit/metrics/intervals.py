"""Intervals: every statistic is a function of per-sequence sums, and its 95% interval is a
percentile bootstrap over sequences (the tokens of one sequence are not independent). Paired
differences of two SAEs evaluated on the same sequences resample the same sequences for both."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

N_BOOT = 1000  # bootstrap resamples for every interval
LEVEL = 0.95

# statistic -> function of summed per-sequence quantities (numbers or arrays of bootstrap sums)
STATISTICS: dict[str, Callable[[dict], np.ndarray]] = {
    "nmse": lambda s: s["err"] / s["norm"],
    "mse_normalized": lambda s: s["err_normalized"] / s["n"],
    "l0": lambda s: s["l0"] / s["n"],
    "ce_recovered": lambda s: (s["zero"] - s["sae"]) / (s["zero"] - s["clean"]),
    "ce_recovered_mean": lambda s: (s["mean"] - s["sae"]) / (s["mean"] - s["clean"]),
    "ce_delta": lambda s: (s["sae"] - s["clean"]) / s["n"],
    "kl": lambda s: s["kl"] / s["n"],
}
RECON_STATS = ("nmse", "mse_normalized", "l0")
CE_STATS = ("ce_recovered", "ce_recovered_mean", "ce_delta", "kl")


def resample_weights(n_seq: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n_seq] how often each sequence is drawn in each bootstrap resample."""
    if n_seq < 2:
        raise ValueError(f"an interval needs at least 2 sequences, got {n_seq}")
    return (
        np.random.default_rng(seed)
        .multinomial(n_seq, np.full(n_seq, 1.0 / n_seq), size=n_boot)
        .astype(np.float64)
    )


def _interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    a = (1 - level) / 2
    lo, hi = np.nanquantile(values, [a, 1 - a])
    return [float(lo), float(hi)]


def bootstrap_intervals(
    per_seq: dict,
    stats: Sequence[str],
    n_boot: int = N_BOOT,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """95% percentile intervals of `stats` (names in STATISTICS) from per-sequence sums {name:
    [n_seq]}."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in per_seq.items() if k != "seq"}
    n_seq = len(next(iter(arrays.values())))
    w = resample_weights(n_seq, n_boot, seed) if weights is None else weights
    boot = {k: w @ v for k, v in arrays.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {name: _interval(STATISTICS[name](boot)) for name in stats}


def paired_difference(a: dict, b: dict, metric: str, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """metric(a) - metric(b) with a 95% bootstrap interval, resampling the same sequences for both.

    a, b: evaluate() results on the same evaluation data (their "per_sequence" sections); only the
    sequences both scored are used. Returns {"metric", "a", "b", "difference", "interval",
    "n_sequences", "excludes_zero"}."""
    part = "ce" if metric in CE_STATS else "recon"
    pa, pb = (m.get("per_sequence", {}).get(part) for m in (a, b))
    if not pa or not pb:
        raise ValueError(
            f"both evaluations need per-sequence {part} sums "
            "(evaluate() with sequences; for CE a model)"
        )
    common = np.intersect1d(pa["seq"], pb["seq"])
    if common.size < 2:
        raise ValueError(
            "the two evaluations share fewer than 2 sequences: evaluate both on the same data"
        )

    def pick(p):
        idx = np.searchsorted(np.asarray(p["seq"]), common)
        return {k: np.asarray(v, dtype=np.float64)[idx] for k, v in p.items() if k != "seq"}

    sa, sb = pick(pa), pick(pb)
    w = resample_weights(common.size, n_boot, seed)
    f = STATISTICS[metric]
    with np.errstate(divide="ignore", invalid="ignore"):
        va, vb = (
            float(f({k: v.sum() for k, v in sa.items()})),
            float(f({k: v.sum() for k, v in sb.items()})),
        )
        diffs = f({k: w @ v for k, v in sa.items()}) - f({k: w @ v for k, v in sb.items()})
    lo, hi = _interval(diffs)
    return {
        "metric": metric,
        "a": va,
        "b": vb,
        "difference": va - vb,
        "interval": [lo, hi],
        "n_sequences": int(common.size),
        "excludes_zero": bool(lo > 0 or hi < 0),
    }


def format_difference(d: dict, name_a: str = "a", name_b: str = "b", digits: int = 4) -> str:
    """'BatchTopK − TopK: +0.0027 [−0.0010, +0.0061]' (and whether the interval excludes zero)."""
    f = lambda v: f"{v:+.{digits}f}".replace("-", "−")
    verdict = "differs" if d["excludes_zero"] else "within noise"
    return (
        f"{d['metric']} {name_a} − {name_b}: {f(d['difference'])} [{f(d['interval'][0])}, "
        f"{f(d['interval'][1])}] ({verdict}; {d['n_sequences']} sequences)"
    )
