"""What mixing buys a stream from the model: BatchTopK SAEs trained straight from the model
(saekit.train.stream.ModelSource) at several window sizes, against the same SAE trained on a shuffled
store of as many tokens, over seeds, evaluated on the same held-out sequences with paired intervals.
Resumable: run it again and every finished SAE and evaluation is reused.

    python results/stream_mixing/run.py [--tokens 65536] [--seeds 0 1 2] [--windows 32 1 8 64]
                                        [--out runs/stream_mixing]

SmolLM2-135M-Instruct resid_post.15, bundled corpus, BatchTopK k=32, 2,304 latents (4x), batch 1,024,
every other setting at saekit's defaults. For each seed (initialisation, batch order and document order):
one SAE from a store of the seed's documents (captured in the seed's order, which is the order the
stream of that seed reads them in, so both train on the same tokens; batches shuffled over the
whole store) and one per window size from the stream. Each is evaluated on the
test split (NMSE and L0 on 16,384 tokens, CE recovered on 4,096 positions), all on the same sequences,
so each stream − store difference has a 95% bootstrap interval over sequences. A window of 1 batch
serves a few whole sequences a batch: what no mixing gives; a window of 64 batches holds the whole
run. θ's final estimate: a store's on 20 of its own batches in another order than training's, a
stream's on 20 batches of its first window in another order than training's.
Writes results/stream_mixing/README.md (the table) and evals/ (each evaluation's JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from saekit.activations import ActivationStore, capture
from saekit.data import packed_corpus
from saekit.metrics import evaluate_many
from saekit.metrics.intervals import paired_difference
from saekit.models import load_model
from saekit.sae import SAEConfig, load_sae
from saekit.sae.theta import estimate
from saekit.train import TrainConfig, train
from saekit.train.stream import ModelSource

HOOK, K, EXPANSION, BATCH = "resid_post.15", 32, 4, 1024
HERE = Path(__file__).resolve().parent
METRICS = ("nmse", "l0", "ce_recovered")


def store(model, out: Path, split: str, tokens: int, seed: int) -> ActivationStore:
    """A store of `tokens` tokens of the split, documents in seed's order (reused where there)."""
    packed = packed_corpus(model.tokenizer, split=split, seq_len=128, max_tokens=tokens, seed=seed)
    folder = out / f"store_{split}_s{seed}"
    return capture(model, packed, HOOK, folder, n_tokens=tokens, progress=False)


def train_one(model, data, name: str, seed: int, tokens: int, out: Path, window: int | None):
    """One SAE into out/NAME (reused where it is there), from the store or a stream."""
    folder = out / name
    if (folder / "train_config.json").exists():
        return
    cfg = SAEConfig(arch="batchtopk", d_in=576, d_sae=576 * EXPANSION, k=K, hook_name=HOOK)
    tc = TrainConfig(total_tokens=tokens, batch_size=BATCH, seed=seed, progress=False)
    source = data if window is None else ModelSource(model, HOOK, window_batches=window)
    t0 = time.perf_counter()
    res = train(source, [cfg], tc, out=folder)
    print(f"{name}: {res.tokens:,} tokens in {time.perf_counter() - t0:.0f} s", flush=True)


def evaluations(model, held, out: Path, names: list[str]) -> dict:
    """Every SAE evaluated on the same held-out sequences (cached in evals/)."""
    evals = HERE / "evals"
    evals.mkdir(exist_ok=True)
    todo = [n for n in names if not (evals / f"{n}.json").exists()]
    if todo:
        saes = [load_sae(next((out / n).glob("batchtopk_*"))) for n in todo]
        results = evaluate_many(saes, model, held, n_tokens=16_384, ce_tokens=4096)
        for n, r in zip(todo, results):
            (evals / f"{n}.json").write_text(json.dumps(r))
    return {n: json.loads((evals / f"{n}.json").read_text()) for n in names}


def theta_sampling(out: Path, seeds: list[int], tokens: int) -> list[str]:
    """θ's final estimate is itself a sample: for each seed's store SAE and window-64 stream SAE,
    θ from 20 batches of the store in two orders and from all of it (the same tokens both
    trained on, float16 as stored), beside the θ each run saved."""
    lines = [
        "",
        "θ's final estimate from 20 batches of 1,024 is a sample of its own: the same SAE on the same"
        " tokens (the seed's store), 20 batches in two orders and all of them, beside the θ the run"
        " saved (the store's from 20 of its own batches in order A, the stream's from 20 of its first"
        " window's in another order than training's, float32). Order B is the store SAE's training"
        " order: its first 20 batches are the ones it trained on first.",
        "",
        "| SAE | saved θ | 20 batches, order A | 20 batches, order B | all batches | A − B |"
        " saved − all |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in seeds:
        rows = ActivationStore(out / f"store_train_s{s}")
        n = tokens // BATCH
        a = [b.float() for b in itertools.islice(rows.batches(BATCH, seed=s + 104729), 20)]
        b = [b.float() for b in itertools.islice(rows.batches(BATCH, seed=s), n)]
        for name in (f"store_s{s}", f"stream_w64_s{s}"):
            folder = out / name
            if not folder.exists():
                continue
            sae = load_sae(next(folder.glob("batchtopk_*")))
            saved = float(sae.threshold)
            got = [saved, *(estimate(sae, x, K)[0] for x in (a, b[:20], b))]
            got += [got[1] - got[2], saved - got[3]]
            lines.append(f"| {name} | " + " | ".join(f"{g:.4f}" for g in got) + " |")
    return lines


def report(evals: dict, seeds: list[int], windows: list[int], tokens: int) -> str:
    lines = [
        "# Streams against a shuffled store",
        "",
        f"`python results/stream_mixing/run.py --tokens {tokens}` ({time.strftime('%Y-%m-%d')}):"
        f" BatchTopK k={K}, {576 * EXPANSION:,} latents, {tokens:,} training tokens each, SmolLM2-135M"
        f"-Instruct {HOOK}. Differences are stream minus store on the same held-out sequences, with"
        " 95% bootstrap intervals over sequences; 'yes' where the interval excludes zero.",
        "",
        "| window (batches) | seed | metric | stream | store | difference | interval | excludes 0 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in windows:
        for s in seeds:
            a, b = evals.get(f"stream_w{w}_s{s}"), evals.get(f"store_s{s}")
            if a is None or b is None:
                continue
            for m in METRICS:
                d = paired_difference(a, b, m)
                lo, hi = d["interval"]
                lines.append(
                    f"| {w} | {s} | {m} | {d['a']:.4f} | {d['b']:.4f} | {d['difference']:+.4f} | "
                    f"[{lo:+.4f}, {hi:+.4f}] | {'yes' if d['excludes_zero'] else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--windows", type=int, nargs="+", default=[32, 1, 8, 64])
    ap.add_argument("--out", default="runs/stream_mixing")
    a = ap.parse_args()
    out = Path(a.out)
    torch.manual_seed(0)
    model = load_model()
    held = store(model, out, "test", 16_384, 0)
    names = []
    for w in [None, *a.windows]:  # the store's SAEs first, then each window over the seeds
        for s in a.seeds:
            name = f"store_s{s}" if w is None else f"stream_w{w}_s{s}"
            data = store(model, out, "train", a.tokens, s) if w is None else None
            train_one(model, data, name, s, a.tokens, out, w)
            names.append(name)
        evals = evaluations(model, held, out, names)
        (HERE / "README.md").write_text(report(evals, a.seeds, a.windows, a.tokens))
    table = report(evals, a.seeds, a.windows, a.tokens)
    (HERE / "README.md").write_text(
        table + "\n".join(theta_sampling(out, a.seeds, a.tokens)) + "\n"
    )


if __name__ == "__main__":
    main()
