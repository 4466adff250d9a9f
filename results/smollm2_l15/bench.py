"""Absorption and sparse probing for the comparison's SAEs: BatchTopK, TopK, JumpReLU (target L0)
and Matryoshka BatchTopK at k = 16/32/64, over seeds 0, 1 and 2. Resumable: SAEs train (or resume)
into --out with run.py's settings, one stream per seed; each SAE's SAEBench JSON lands in
results/smollm2_l15/bench/seed0/ (seed1/, seed2/) and a re-run skips what is there.

    python results/smollm2_l15/bench.py [--seeds 0 1 2] [--out runs/smollm2_l15_bench] [--report]

--report writes bench.md: each SAE's figures with 95% intervals, paired differences BatchTopK
minus each other architecture at the same k and seed (absorption: letters, then words, resampled
alike for both SAEs; sparse probing: test documents resampled alike), and the same differences
averaged over the seeds, with letters, words and documents resampled alike in every seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import t as t_dist

from saekit.activations import capture_splits
from saekit.bench import bench
from saekit.bench.output import output_path
from saekit.bench.summary import (
    absorbed_l0,
    absorption_boot,
    absorption_difference,
    interval,
    probing_boot,
    probing_difference,
)
from saekit.models import load_model
from saekit.jobs.sweep import sweep_configs
from saekit.train import TrainConfig, train

HOOK, TOKENS, BATCH, EXPANSION = "resid_post.15", 786_432, 1024, 8
ARCHS, KS = ("batchtopk", "topk", "jumprelu", "matryoshka"), (16, 32, 64)
EVALS = ("absorption", "sparse-probing")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "bench"


def run_seed(seed: int, out: Path, model, store) -> None:
    meta = dict(hook_name=HOOK, model_name=store.manifest["model"], dataset="bundled")
    meta["context_size"] = store.manifest["seq_len"]
    cfgs = sweep_configs(store.d_model, ARCHS, KS, EXPANSION, dead_tokens=5 * BATCH, **meta)
    folder = out / f"seed{seed}"
    t0 = time.perf_counter()
    tc = TrainConfig(
        total_tokens=TOKENS, batch_size=BATCH, seed=seed, warmup_steps=50, checkpoint_every=100,
        autocast=False,
    )  # fmt: skip
    res = train(store, cfgs, tc, out=folder)  # a finished run is reused, an interrupted one resumes
    print(f"seed {seed}: {len(cfgs)} SAEs trained, {time.perf_counter() - t0:.0f} s", flush=True)
    dirs = [res.out / name for name in res.names]
    bench(dirs, EVALS, out=RESULTS / f"seed{seed}", cache=out / "bench_cache")
    print(f"seed {seed}: benched, {time.perf_counter() - t0:.0f} s", flush=True)


def load(seed: int, name: str) -> dict | None:
    docs = {}
    for e in EVALS:
        path = output_path(RESULTS / f"seed{seed}", e, name)
        if not path.exists():
            return None
        docs[e] = json.loads(path.read_text())
    return docs


def scored_items(docs: dict) -> tuple:
    """What a seed's bootstrap resamples: the letters kept, the words scored, the test documents."""
    ab, sp = docs["absorption"], docs["sparse-probing"]
    letters = [d["first_letter"] for d in ab["eval_result_details"]]
    words = [(w["letter"], w["word"]) for w in ab["eval_result_unstructured"]["words"]]
    tasks = sp["eval_result_unstructured"]["tasks"].values()
    documents = sorted({d for t in tasks for d in t["per_document"]["sae_top_1"]["doc"]})
    return tuple(letters), tuple(words), tuple(documents)


def over_seeds(points: list[float]) -> list[float]:
    """A 95% Student-t interval for the mean of the seeds' differences (n - 1 d.f.)."""
    if len(points) < 2:
        return [float("nan")] * 2
    half = t_dist.ppf(0.975, len(points) - 1) * np.std(points, ddof=1) / np.sqrt(len(points))
    return [float(np.mean(points) - half), float(np.mean(points) + half)]


def pooled_difference(differences: list[tuple]) -> tuple:
    """One measure's paired differences, one (point, interval, draws) a seed, averaged over the
    seeds: (mean, 95% interval over the scored items, 95% interval over the seeds). Every seed
    scored the same letters, words and documents (`scored_items`), so the bootstraps' fixed seed
    resampled them alike and the draws average."""
    points = [d[0] for d in differences]
    draws = np.mean([d[2] for d in differences], axis=0)
    return float(np.mean(points)), interval(draws), over_seeds(points)


def span(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt(value: float, ci) -> str:
    return f"{value:.3f} {span(ci)}"


def sae_row(seed: int, k: int, arch: str, docs: dict) -> str:
    """One SAE's figures: absorption with its interval, full absorption, split latents, the L0 of
    absorbed words minus the others', top-1 probing accuracy with its interval, top-5."""
    ab, sp = docs["absorption"], docs["sparse-probing"]
    m, p = ab["eval_result_metrics"]["mean"], sp["eval_result_metrics"]["sae"]
    l0 = absorbed_l0(ab)
    return (
        f"| {seed} | {k} | {arch} | "
        f"{fmt(m['mean_absorption_fraction_score'], interval(absorption_boot(ab)))} | "
        f"{m['mean_full_absorption_score']:.3f} | {m['mean_num_split_features']:.2f} | "
        f"{fmt(l0['difference'], l0['interval'])} | "
        f"{fmt(p['sae_top_1_test_accuracy'], interval(probing_boot(sp)))} | "
        f"{p['sae_top_5_test_accuracy']:.3f} |"
    )


def report() -> None:
    names = {a: {k: f"{a}_{'l0' if a == 'jumprelu' else 'k'}{k}_4608" for k in KS} for a in ARCHS}
    found = {(s, a, k): load(s, names[a][k]) for s in (0, 1, 2) for a in ARCHS for k in KS}
    found = {key: docs for key, docs in found.items() if docs is not None}
    lines = ["# Absorption and sparse probing, by architecture", "", __doc__.split("\n\n")[0], ""]
    if found:
        llm = next(iter(found.values()))["sparse-probing"]["eval_result_metrics"]["llm"]
        lines += [
            "The model's own probes on the same tasks: top-1 "
            f"{llm['llm_top_1_test_accuracy']:.3f}, top-5 {llm['llm_top_5_test_accuracy']:.3f}, "
            f"all dimensions {llm['llm_test_accuracy']:.3f}. Absorbed words' L0: the mean L0 of "
            "the scored words with an absorption fraction above 0 minus that of the others (TopK's "
            "is 0 by construction: every token takes k latents).",
            "",
        ]
    lines += [
        "| seed | k | architecture | absorption | full absorption | split "
        "| absorbed words' L0 − others' | SAE top-1 | SAE top-5 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    diffs = ["", "## BatchTopK minus each architecture, paired", ""]
    diffs += [
        "Positive absorption: BatchTopK absorbs more. Positive accuracy: BatchTopK probes better.",
        "",
    ]
    diffs += ["| seed | k | other | absorption | SAE top-1 accuracy |", "|---|---|---|---|---|"]
    paired = {}  # (seed, other, k): BatchTopK minus other, absorption and probing
    for seed in (0, 1, 2):
        for k in KS:
            lines += [
                sae_row(seed, k, a, found[seed, a, k]) for a in ARCHS if (seed, a, k) in found
            ]
            base = found.get((seed, "batchtopk", k))
            for a in ARCHS[1:]:
                if base is None or (seed, a, k) not in found:
                    continue
                other = found[seed, a, k]
                paired[seed, a, k] = (
                    absorption_difference(base["absorption"], other["absorption"]),
                    probing_difference(base["sparse-probing"], other["sparse-probing"]),
                )
                da, dp = paired[seed, a, k]
                diffs.append(f"| {seed} | {k} | {a} | {fmt(*da[:2])} | {fmt(*dp[:2])} |")
    pooled = ["", "## BatchTopK minus each architecture, averaged over the seeds", ""]
    pooled += [
        "Two intervals for each mean of the seeds' paired differences. *Items*: each seed's "
        "paired bootstrap draws averaged draw by draw, with letters, words and documents "
        "resampled alike in every seed; it counts the sampling of letters, words and documents "
        "but not the spread between seeds. *Seeds*: a Student-t interval over the seeds' "
        "differences (2 degrees of freedom with 3 seeds); it counts the spread between seeds.",
        "",
    ]
    pooled += [
        "| k | other | seeds | absorption | items | seeds | SAE top-1 accuracy | items | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in KS:
        for a in ARCHS[1:]:
            seeds = [s for s in (0, 1, 2) if (s, a, k) in paired]
            if seeds:
                items = {scored_items(found[s, b, k]) for s in seeds for b in ("batchtopk", a)}
                if len(items) != 1:
                    raise ValueError("the seeds scored different letters, words or documents")
                da = pooled_difference([paired[s, a, k][0] for s in seeds])
                dp = pooled_difference([paired[s, a, k][1] for s in seeds])
                cells = [f"{v:.3f}" if np.isscalar(v) else span(v) for v in (*da, *dp)]
                pooled.append(f"| {k} | {a} | {len(seeds)} | " + " | ".join(cells) + " |")
    (HERE / "bench.md").write_text("\n".join(lines + diffs + pooled) + "\n")
    print(f"-> {HERE / 'bench.md'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/smollm2_l15_bench")
    ap.add_argument("--report", action="store_true", help="only write bench.md from what is done")
    a = ap.parse_args(argv)
    if not a.report:
        out = Path(a.out)
        model = load_model()
        store, _ = capture_splits(model, HOOK, out, 600_000, 30_000)
        for seed in a.seeds:
            run_seed(seed, out, model, store)
    report()


if __name__ == "__main__":
    main()
