"""Absorption and sparse probing for the comparison's SAEs: BatchTopK, TopK, JumpReLU (target L0)
and Matryoshka BatchTopK at k = 16/32/64, over seeds 0, 1 and 2. Resumable: SAEs train (or resume)
into --out with run.py's settings, one stream per seed; each SAE's SAEBench JSON lands in
results/smollm2_l15/bench/seedS/ and a re-run skips what is there.

    python results/smollm2_l15/bench.py [--seeds 0 1 2] [--out runs/smollm2_l15_bench] [--report]

--report writes bench.md: each SAE's figures with 95% intervals, and paired differences BatchTopK
minus each other architecture at the same k and seed (absorption: letters, then words, resampled
alike for both SAEs; sparse probing: test documents resampled alike).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saekit.activations import capture_splits
from saekit.bench import bench
from saekit.bench.output import output_path
from saekit.bench.summary import (
    absorption_boot,
    absorption_difference,
    interval,
    probing_boot,
    probing_difference,
)
from saekit.models import load_model
from saekit.sweep import sweep_configs
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


def fmt(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def report() -> None:
    names = {a: {k: f"{a}_{'l0' if a == 'jumprelu' else 'k'}{k}_4608" for k in KS} for a in ARCHS}
    lines = ["# Absorption and sparse probing, by architecture", "", __doc__.split("\n\n")[0], ""]
    lines += [
        "| seed | k | architecture | absorption | full absorption | split | SAE top-1 | SAE top-5 |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    diffs = ["", "## BatchTopK minus each architecture, paired", ""]
    diffs += ["| seed | k | other | absorption | SAE top-1 accuracy |", "|---|---|---|---|---|"]
    for seed in (0, 1, 2):
        for k in KS:
            docs = {a: load(seed, names[a][k]) for a in ARCHS}
            for a, d in docs.items():
                if d is None:
                    continue
                ab, sp = d["absorption"], d["sparse-probing"]
                m, p = ab["eval_result_metrics"]["mean"], sp["eval_result_metrics"]["sae"]
                lines.append(
                    f"| {seed} | {k} | {a} | "
                    f"{fmt(m['mean_absorption_fraction_score'], interval(absorption_boot(ab)))} | "
                    f"{m['mean_full_absorption_score']:.3f} | {m['mean_num_split_features']:.2f} | "
                    f"{fmt(p['sae_top_1_test_accuracy'], interval(probing_boot(sp)))} | "
                    f"{p['sae_top_5_test_accuracy']:.3f} |"
                )
            base = docs["batchtopk"]
            for a in ARCHS[1:]:
                if base is None or docs[a] is None:
                    continue
                da = absorption_difference(base["absorption"], docs[a]["absorption"])
                dp = probing_difference(base["sparse-probing"], docs[a]["sparse-probing"])
                diffs.append(f"| {seed} | {k} | {a} | {fmt(*da)} | {fmt(*dp)} |")
    (HERE / "bench.md").write_text("\n".join(lines + diffs) + "\n")
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
