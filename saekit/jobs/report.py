"""`saekit report RUN_DIR` -> RUN_DIR/report.html: one self-contained page with a run's figures.

A run folder is what `saekit demo` writes: metrics.json, store_test/ (held-out activations) and
train/NAME/ (SAE folders with train_log.csv). A sweep table (sweep.csv) anywhere under the run adds
the frontier. The page holds the summary, the training curves, adaptive allocation, and a feature
dashboard for each chosen latent (or a spread of them from dense to rare).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import analysis, viz
from ..activations import ActivationStore, open_store
from ..metrics import reconstruction_metrics
from ..plumbing.checks import hook_on_store
from ..plumbing.files import atomic_write_bytes, prepare_output
from ..sae import load_sae

SAMPLE_CHARS = 600


def _sae_dirs(run: Path) -> dict[str, Path]:
    dirs = sorted(p.parent for p in run.glob("train/*/cfg.json"))
    if not dirs:
        raise FileNotFoundError(
            f"{run} holds no trained SAE (expected train/NAME/cfg.json); run `saekit demo` first"
        )
    return {d.name: d for d in dirs}


def _label(sae, name: str) -> str:
    return f"{sae.label} ({name})"


def _sample_text(store: ActivationStore, tokenizer, seq: int = 0) -> str:
    """Held-out text to show: one stored sequence, decoded without BOS/padding."""
    ids = [int(t) for t, d in zip(store.tokens[seq], store.doc_ids[seq]) if d >= 0]
    return tokenizer.decode(ids)[:SAMPLE_CHARS]


def _dashboard(index, sae, model, lat: int) -> list:
    """One latent's dashboard for the page: what FeatureExplorer shows, as static HTML and
    figures."""
    _, vals = index.activations(lat)
    link = lambda j, c: f"<a href='#latent-{j}'>#{j}</a> ({c:.2f})"
    neigh = ", ".join(link(j, c) for j, c in index.neighbours(lat))
    fire = ", ".join(link(j, c) for j, c in index.coactivation_neighbours(lat))
    top = float(vals.max()) if len(vals) else None
    groups = viz.quantile_groups_html(index.quantile_groups(lat), top)
    head = (
        f"<h3 id='latent-{lat}'>Latent {lat} &mdash; fires on {index.density[lat]:.2%} of "
        f"tokens, max activation {top or 0:.3f}</h3><p>nearest by decoder cosine: "
        f"{neigh or 'none'}<br>fires together with: {fire or 'none'}</p><h4>Top activations</h4>"
        + viz.examples_html(index.top_examples(lat, 12))
        + "<h4>Across its range (quantile groups)</h4>"
        + groups
    )
    return [
        head,
        viz.activation_histogram_figure(vals, lat, float(index.density[lat])),
        viz.logit_effects_figure(analysis.logit_effects(sae, model, lat), lat),
    ]


def _training_logs(dirs: dict[str, Path], saes: dict) -> tuple[dict, dict]:
    logs = {
        n: pd.read_csv(d / "train_log.csv")
        for n, d in dirs.items()
        if (d / "train_log.csv").exists()
    }
    targets = {n: s.l0_target for n, s in saes.items()}
    return logs, targets


def build_report(
    run_dir: str | Path,
    model=None,
    n_tokens: int = 8192,
    n_features: int = 6,
    progress: bool = True,
    latents: list[int] | None = None,
) -> Path:
    """Compute the figures for a run folder and write report.html beside it. Returns the path.
    latents: the BatchTopK SAE's latents to give a dashboard each (None: n_features of them,
    dense to rare)."""
    from ..models import load_model

    run = Path(run_dir)
    dirs = _sae_dirs(run)
    prepare_output(run, 0, "run folder")  # report.html is written there at the end
    saes = {name: load_sae(d) for name, d in dirs.items()}
    held = run / "store_test"
    store = open_store(held if held.exists() else run / "store_train")
    first = next(iter(saes.values()))
    model = model or load_model(first.cfg.model_name, device="cpu")
    summary, per_token = _summary(run, saes, store)
    sections: list[tuple[str, str, object]] = [summary]  # (title, prose, figure or html string)
    logs, targets = _training_logs(dirs, saes)
    if logs:
        sections.append(
            (
                "Training",
                "Each SAE's log against training tokens (train/NAME/train_log.csv).",
                viz.training_curves_figure(logs, targets),
            )
        )
    sections += _allocation(saes, model, store, per_token, n_tokens)
    sections.append(_dashboards(saes, model, store, n_tokens, n_features, latents, progress))
    sweeps = sorted(run.rglob("sweep.csv"))
    if sweeps:
        from .sweep import load_sweep

        where = html.escape(str(sweeps[0].relative_to(run)))
        frontier = viz.frontier_figure(load_sweep(sweeps[0]))
        sections.append(("Frontier", f"From {where}.", frontier))
    if (run / "bench").is_dir():
        sections += _bench_sections(run / "bench")
    out = run / "report.html"
    page = render(sections, title=f"saekit report: {run.name}")
    atomic_write_bytes(out, lambda fh: fh.write(page.encode()))
    return out


def _summary(run: Path, saes: dict, store) -> tuple[tuple, dict]:
    """The summary section (each SAE on the held-out store; the demo's downstream metrics where
    metrics.json has them), and each SAE's per-token L0 there."""
    rows, per_token = [], {}
    for name, sae in saes.items():
        batches = store.head_batches(len(store), 4096, hook_on_store(sae, store))
        m = reconstruction_metrics(sae, batches, mode=None)
        per_token[_label(sae, name)] = m["_per_token_l0"].numpy()
        rows.append(
            f"<tr><td>{html.escape(_label(sae, name))}</td><td>{sae.cfg.d_sae}</td>"
            f"<td>{m['l0']:.1f}</td>"
            f"<td>{m['nmse']:.4f}</td><td>{m['fvu']:.4f}</td><td>{m['dead_fraction']:.3f}</td></tr>"
        )
    table = (
        "<table><tr><th>SAE</th><th>latents</th><th>L0</th><th>NMSE</th><th>FVU</th><th>dead</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    if (run / "metrics.json").exists():
        table += _downstream_html(json.loads((run / "metrics.json").read_text()))
    first = next(iter(saes.values()))
    prose = (
        f"Held-out activations: {len(store):,} tokens at "
        f"<code>{html.escape(str(first.cfg.hook_name))}</code> of "
        f"{html.escape(str(first.cfg.model_name))}."
    )
    return ("Summary", prose, table), per_token


def _downstream_html(metrics: dict) -> str:
    """The demo's CE recovered and KL with intervals, and BatchTopK's L0 in both modes."""
    d = metrics.get("downstream")
    if not d:
        return ""
    iv = d.get("intervals") or {}
    ci = lambda k: f" [{iv[k][0]:.4f}, {iv[k][1]:.4f}]" if iv.get(k) else ""
    out = (
        f"<p>Downstream ({html.escape(str(metrics['sae']['architecture']))}, "
        f"{d['n_tokens']:,} positions in {d.get('n_sequences', '?')} held-out "
        f"sequences): CE clean {d['ce_clean']:.3f}, with the SAE spliced in "
        f"{d['ce_sae']:.3f}, zero-ablated {d['ce_zero_ablation']:.3f} (nats per token): "
        f"<b>CE recovered {d['ce_recovered']:.4f}{ci('ce_recovered')}</b>, KL "
        f"{d['kl']:.4f}{ci('kl')} (95% bootstrap intervals over sequences).</p>"
    )
    sp = metrics.get("sparsity") or {}
    if "l0_batch_mode" in sp:
        theta_source = (metrics["sae"].get("theta_info") or {}).get("source", "training")
        out += (
            f"<p>BatchTopK's L0 on held-out text: {sp['l0_threshold_mode']:.2f} in threshold "
            f"mode (theta {metrics['sae'].get('theta', float('nan')):.4f}, "
            f"{html.escape(str(theta_source))}), {sp['l0_batch_mode']:.2f} in batch mode.</p>"
        )
    return out


def _batchtopk(saes: dict) -> tuple[str, object]:
    """The run's BatchTopK SAE (name, SAE), or its first SAE where it has none."""
    return next(
        ((n, s) for n, s in saes.items() if s.cfg.arch == "batchtopk"), next(iter(saes.items()))
    )


def _allocation(saes: dict, model, store, per_token: dict, n_tokens: int) -> list[tuple]:
    """Latents per token on a sample text, their distribution, and what goes with more."""
    text = _sample_text(store, model.tokenizer)
    tables = {_label(s, n): analysis.latent_counts(s, model, text) for n, s in saes.items()}
    bt_name, bt = _batchtopk(saes)
    props = analysis.token_properties(bt, model, store, n_tokens=min(n_tokens, 4096))
    corr = analysis.count_correlations(props)
    return [
        (
            "Adaptive allocation: latents per token",
            "Each token shaded by its number of active latents (hover for its "
            "strongest latents). TopK gives every token the same k; BatchTopK "
            "(threshold mode) gives each token what it needs.",
            viz.token_counts_figure(tables),
        ),
        (
            "Per-token L0 distribution",
            "Over the held-out tokens.",
            viz.l0_distribution_figure(per_token),
        ),
        (
            f"What goes with more latents ({_label(bt, bt_name)})",
            "Spearman correlation of a token's latent count with its properties.",
            viz.count_property_figure(props, corr),
        ),
    ]


def _dashboards(saes: dict, model, store, n_tokens, n_features, latents, progress) -> tuple:
    """A feature dashboard for each chosen latent of the BatchTopK SAE (None: n_features of them,
    from dense to rare)."""
    bt_name, bt = _batchtopk(saes)
    index = analysis.build_feature_index(
        bt, store, n_tokens=n_tokens, tokenizer=model.tokenizer, progress=progress
    )
    if latents is None:
        alive = np.nonzero(index.density > 0)[0]
        by_density = alive[np.argsort(-index.density[alive])]
        latents = by_density[:: max(1, len(alive) // n_features)][:n_features]
    bad = [int(j) for j in latents if not 0 <= int(j) < bt.cfg.d_sae]
    if bad:
        raise ValueError(
            f"latents {bad} are out of range: {_label(bt, bt_name)} has {bt.cfg.d_sae} latents "
            f"(0..{bt.cfg.d_sae - 1})"
        )
    feats = [part for lat in latents for part in _dashboard(index, bt, model, int(lat))]
    return (
        f"Feature dashboards ({_label(bt, bt_name)})",
        "For each latent: its top contexts with every token shaded by its activation (hover "
        "for the value), examples from each quarter of its range with their share of its "
        "firings, its neighbours by decoder cosine and by firing together, its activation "
        "histogram, and its logit effects (through the final norm's gain and the "
        "unembedding).",
        feats,
    )


def _bench_sections(folder: Path) -> list:
    """SAEBench's evaluations (`saekit bench --out RUN_DIR/bench`), when they were run."""
    from ..bench import read_all, summary_table
    from ..bench.summary import formatted

    results = read_all(folder)
    if not results:
        return []
    table = formatted(summary_table(results)).to_html(index=False, border=0)
    out = [
        (
            "SAEBench's evaluations",
            "From saekit bench (docs/bench.md): absorption with a 95% interval over letters and "
            "words, sparse probing's top-1 accuracy with one over test documents, CE loss score "
            "with one over sequences.",
            table,
        )
    ]
    figures = (
        (
            "absorption",
            "First-letter absorption",
            "Mean absorption fraction per letter (letters whose probe reached F1 0.6).",
            viz.absorption_by_letter_figure,
        ),
        (
            "sparse-probing",
            "Sparse probing",
            "Test accuracy with the top k latents, beside the model's own top k dimensions.",
            viz.probing_by_k_figure,
        ),
    )
    for name, head, prose, figure in figures:
        docs = {sae: d[name] for sae, d in results.items() if name in d}
        if docs:
            out.append((head, prose, figure(docs)))
    return out


def render(sections, title: str) -> str:
    """One HTML page; plotly.js is inlined once so the page works offline."""
    parts, first = [], True
    for head, prose, body in sections:
        items = []
        for item in body if isinstance(body, list) else [body]:
            if hasattr(item, "to_html"):
                item = item.to_html(full_html=False, include_plotlyjs=first)
                first = False
            items.append(item)
        parts.append(
            f"<section><h2>{html.escape(head)}</h2><p>{prose}</p>{''.join(items)}</section>"
        )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 "
        "1em;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px "
        "10px;text-align:right}"
        "section{margin-bottom:2.5em}h2{border-bottom:2px solid #d62728}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )
