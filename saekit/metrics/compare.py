"""Two saved evaluations compared: paired differences only where both were made on the same data,
at the same hook, in the same mode (`saekit compare`)."""

from __future__ import annotations

from pathlib import Path

from ..plumbing.files import read_json_object
from .evaluate import SCHEMA
from .intervals import CE_STATS, RECON_STATS, format_difference, paired_difference


class EvaluationError(ValueError):
    """An evaluation file that cannot be read, or two that cannot be paired."""


def read_evaluation(path: str | Path) -> dict:
    """A file written by `saekit eval --out` (or evaluate()), checked to be one."""
    fix = "give a file written by `saekit eval --out`"
    e = read_json_object(Path(path), EvaluationError, fix)
    schema = e.get("schema")
    if not (isinstance(schema, str) and schema.startswith(SCHEMA.split("/")[0] + "/")):
        raise EvaluationError(
            f"{path} is not a saekit evaluation (its 'schema' is {schema!r}, expected "
            f"{SCHEMA!r}); {fix}"
        )
    for key, kind in (("sae", dict), ("per_sequence", dict), ("mode", str)):
        if not isinstance(e.get(key), kind):
            raise EvaluationError(
                f"{path}: field '{key}' is {e.get(key)!r}, expected a JSON "
                f"{'object' if kind is dict else 'string'}; {fix}"
            )
    return e


def mismatches(a: dict, b: dict) -> list[str]:
    """What differs between the data two evaluations were made on: the data's identity (not its
    path), the hook read and the mode. Empty where their sequences pair up."""
    out = []
    da, db = a.get("data"), b.get("data")
    if not da or not db:
        which = " and ".join(n for n, d in (("A", da), ("B", db)) if not d)
        out.append(f"{which} does not record its data's identity (re-run `saekit eval --out`)")
    else:
        out += [
            f"data {k}: {da.get(k)} in A, {db.get(k)} in B"
            for k in sorted(set(da) | set(db))
            if da.get(k) != db.get(k)
        ]
        if da.get("tokens_sha256") is None and not out:
            out.append("the data has no token ids to identify it by")
    ha, hb = a["sae"].get("hook_name"), b["sae"].get("hook_name")
    if ha != hb:
        out.append(f"hook: {ha} in A, {hb} in B")
    if a["mode"] != b["mode"]:
        out.append(f"mode: {a['mode']} in A, {b['mode']} in B")
    return out


def shared_metrics(a: dict, b: dict, asked: list[str] | None = None) -> list[str]:
    """The metrics both evaluations hold per sequence (the CE ones need a model in both), in the
    order asked for (None: all)."""
    parts = [e["per_sequence"] for e in (a, b)]
    return [
        m
        for m in asked or [*RECON_STATS, *CE_STATS]
        if all(p.get("ce" if m in CE_STATS else "recon") for p in parts)
    ]


def compare_lines(
    a: dict,
    b: dict,
    names: tuple[str, str],
    metrics: list[str] | None = None,
    allow_mismatch: bool = False,
) -> list[str]:
    """One line per metric: A - B with a paired 95% interval where the evaluations pair up. Where
    they do not, an EvaluationError naming each difference; with allow_mismatch, each one's own
    figure and interval side by side, unpaired."""
    differ = mismatches(a, b)
    for e, name in zip((a, b), "AB"):
        if not e["per_sequence"].get("recon"):
            raise EvaluationError(
                f"evaluation {name} holds no per-sequence sums: it was made on "
                f"{e.get('n_sequences')} sequence(s), and a paired interval needs at least 2 "
                "shared sequences. Evaluate both with more --tokens"
            )
    chosen = shared_metrics(a, b, metrics)
    if not chosen:
        raise EvaluationError(
            f"the evaluations share none of the metrics {metrics or 'asked for'} per sequence "
            "(the CE metrics need both evaluated with a model)"
        )
    if differ and not allow_mismatch:
        raise EvaluationError(
            f"the evaluations do not pair up: {'; '.join(differ)}. Evaluate both on one store, "
            "at one hook, in one mode, or pass --allow-mismatch to see each figure with its own "
            "interval, unpaired"
        )
    if differ:
        lines = [f"unpaired ({'; '.join(differ)}): each figure with its own 95% interval"]
        for m in chosen:
            lines.append(f"{m}: " + "; ".join(_own(e, m, n) for e, n in zip((a, b), names)))
        return lines
    lines = []
    for m in chosen:
        try:
            lines.append(format_difference(paired_difference(a, b, m), *names))
        except ValueError as e:
            raise EvaluationError(f"{m}: {e}") from None
    return lines


def _own(e: dict, metric: str, name: str) -> str:
    """One evaluation's figure and interval for `metric`, as saved."""
    part = (e.get("downstream") or {}) if metric in CE_STATS else e.get("reconstruction", {})
    value = part.get(metric, e.get("sparsity", {}).get(metric))
    lo_hi = (e.get("intervals") or {}).get(metric) or (part.get("intervals") or {}).get(metric)
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
    return f"{name} {shown}" + (f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else "")
