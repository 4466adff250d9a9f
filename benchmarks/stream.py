"""Training straight from the model against capture-then-train, side by side in one run, and a
stream's memory and disk against the token count.

    python benchmarks/stream.py [--tokens 65536] [--hook resid_post.15] [--runs a b c] [--json F]
    python benchmarks/stream.py --memory [--sizes 100000 1000000] [--hook resid_post.2]

Speed (same machine, model, corpus, token count, batch and dictionary; BatchTopK k=32, 8x):
  (a) saekit streaming: `train(ModelSource(...))`, the model's forward inside training;
  (b) saekit capture then train: `capture` into a store, then `train` on it, both phases counted.
Each prints tokens/s, the share of the run in the model's forward and in the rest (the SAE step,
initialisation, calibration), and the held-out NMSE (the test split, 8,192 tokens). Then three hooks
from one forward (three SAEs on one stream) against three streams of one hook each. SAELens's
on-the-fly trainer:
  (c) SAELens's `LanguageModelSAETrainingRunner` on the embedded model's folder (see `saelens`).

Memory: a child process per size trains from the stream and reports its peak resident memory and
the run folder's size on disk; the ratios between sizes should stay near 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saekit.activations import capture
from saekit.data import packed_corpus
from saekit.data.corpus import corpus_split
from saekit.interop import from_saelens_sae
from saekit.metrics import evaluate
from saekit.models import (
    d_model,
    embedded_folder,
    load_model,
    model_name,
    resolve_hook,
    underlying,
)
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, train
from saekit.train.config import default_lr
from saekit.train.stream import ModelSource

K, EXPANSION = 32, 8


def _cfgs(model, hooks) -> list[SAEConfig]:
    d = d_model(model)
    return [
        SAEConfig(arch="batchtopk", d_in=d, d_sae=d * EXPANSION, k=K, hook_name=h) for h in hooks
    ]


def _tc(tokens: int, batch: int) -> TrainConfig:
    """Defaults, but the start's sample and θ's final batches no more than the run itself."""
    steps = max(1, tokens // batch)
    return TrainConfig(
        total_tokens=tokens,
        batch_size=batch,
        progress=False,
        checkpoint_every=0,
        init_tokens=min(TrainConfig.init_tokens, tokens),
        calibrate_batches=min(TrainConfig.calibrate_batches, steps),
    )


def streamed(model, hooks, tokens, batch, out: Path, window: int | None = None):
    """(a): one stream from the model feeding an SAE at every hook."""
    source = ModelSource(model, hooks, window_batches=window)
    t0 = time.perf_counter()
    res = train(source, _cfgs(model, hooks), _tc(tokens, batch), out=out)
    total = time.perf_counter() - t0
    share = source.forward_s / total
    return {"seconds": total, "tokens_per_s": tokens / total, "forward_share": share}, res.saes


def captured(model, hook, tokens, batch, out: Path) -> tuple[dict, list]:
    """(b): capture the same number of tokens into a store, then train on it; both counted."""
    t0 = time.perf_counter()
    packed = packed_corpus(model.tokenizer, split="train", seq_len=128, max_tokens=tokens, seed=0)
    store = capture(model, packed, hook, out / "store", n_tokens=tokens, progress=False)
    forward = time.perf_counter() - t0
    res = train(store, _cfgs(model, [hook]), _tc(tokens, batch), out=out / "train")
    total = time.perf_counter() - t0
    return {
        "seconds": total,
        "tokens_per_s": tokens / total,
        "forward_share": forward / total,
    }, res.saes


def saelens(model, hook, tokens, batch, out: Path, buffer: int = 20) -> tuple[dict, list]:
    """(c): SAELens's on-the-fly trainer (LanguageModelSAETrainingRunner) on the same model, read
    from the embedded model's local folder with model_class_name="AutoModelForCausalLM"; what else
    it needed: the hook as the Hugging Face module's name (resid_post.L is model.layers.L), the
    bundled corpus handed over as a Dataset (no hub to name), prepend_bos=False (its wrapper of a
    Hugging Face model takes no other), and saekit's learning rate, so both train the same SAE.
    The model's loading is not counted, as it is not for (a). buffer: SAELens's n_batches_in_buffer
    (its default, 20; smaller only for dry runs)."""
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
    )

    folder, point = embedded_folder(), resolve_hook(model, hook)
    if point.io != "output":
        raise SystemExit(f"(c) reads a module's output; {hook} is read from an input")
    d = d_model(model)
    cfg = LanguageModelSAERunnerConfig(
        sae=BatchTopKTrainingSAEConfig(d_in=d, d_sae=d * EXPANSION, k=K),
        model_name=str(folder),
        model_class_name="AutoModelForCausalLM",
        hook_name=point.module_path,
        dataset_path=str(folder),  # a label only: the data set is handed over below
        is_dataset_tokenized=False,
        streaming=False,
        context_size=128,
        prepend_bos=False,
        training_tokens=tokens,
        train_batch_size_tokens=batch,
        store_batch_size_prompts=16,
        n_batches_in_buffer=buffer,
        lr=default_lr(d * EXPANSION),
        device=str(next(underlying(model).parameters()).device),
        seed=0,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=str(out),
        verbose=False,
    )
    train_split, _ = corpus_split(None, "train")
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=train_split)
    forward = [0.0]
    get = runner.activations_store.get_activations

    def timed(*args, **kw):
        t = time.perf_counter()
        try:
            return get(*args, **kw)
        finally:
            forward[0] += time.perf_counter() - t

    runner.activations_store.get_activations = timed
    t0 = time.perf_counter()
    sae = runner.run()
    total = time.perf_counter() - t0
    row = {"seconds": total, "tokens_per_s": tokens / total, "forward_share": forward[0] / total}
    ours = from_saelens_sae(sae)
    # SAELens names the module and the folder; the held-out store, the hook and the model
    ours.cfg.hook_name, ours.cfg.model_name = hook, model_name(model)
    return row, [ours]


def held_out(model, sae, hook, tmp: Path) -> tuple[float, float]:
    """(NMSE, L0) on the test split's first 8,192 tokens."""
    held = tmp / f"held_{hook}"
    if not held.exists():
        packed = packed_corpus(model.tokenizer, split="test", seq_len=128, max_tokens=8192, seed=0)
        capture(model, packed, hook, held, n_tokens=8192, progress=False)
    got = evaluate(sae, None, held, n_tokens=8192)
    return got["reconstruction"]["nmse"], got["sparsity"]["l0"]


RUNS = {"a": "saekit streaming", "b": "capture then train", "c": "SAELens on the fly"}


def one_run(name: str, model, a, tmp: Path) -> tuple[dict, list]:
    if name == "a":
        return streamed(model, [a.hook], a.tokens, a.batch, tmp / name, a.window)
    if name == "b":
        return captured(model, a.hook, a.tokens, a.batch, tmp / name)
    return saelens(model, a.hook, a.tokens, a.batch, tmp / name, a.saelens_buffer)


def speed(a) -> dict:
    model = load_model(device=a.device)
    tmp = Path(tempfile.mkdtemp(prefix="stream_bench_"))
    try:
        got = {}
        for name in a.runs:
            row, saes = one_run(name, model, a, tmp)
            row["nmse"], row["l0"] = held_out(model, saes[0], a.hook, tmp)
            got[name] = row
            print(
                f"({name}) {RUNS[name]:<20} {row['tokens_per_s']:>9,.0f} tok/s  "
                f"forward {row['forward_share']:.0%}  rest {1 - row['forward_share']:.0%}  "
                f"held-out NMSE {row['nmse']:.4f} at L0 {row['l0']:.1f}",
                flush=True,
            )
        for x, y in (("a", "b"), ("a", "c")):
            if x in got and y in got:
                got[f"{x}_over_{y}"] = got[x]["tokens_per_s"] / got[y]["tokens_per_s"]
                print(f"({x}) / ({y}): {got[f'{x}_over_{y}']:.2f}x tokens/s", flush=True)
        if not a.three:
            return got
        layer = int(a.hook.split(".")[1])
        three = [f"resid_post.{max(0, layer - 2 * i)}" for i in (2, 1, 0)]
        one_forward, _ = streamed(model, three, a.tokens, a.batch, tmp / "three", a.window)
        separate = sum(
            streamed(model, [h], a.tokens, a.batch, tmp / f"one_{h}", a.window)[0]["seconds"]
            for h in three
        )
        got["three_hooks"] = {
            "one_forward_s": one_forward["seconds"],
            "separate_s": separate,
            "ratio": separate / one_forward["seconds"],
            "hooks": three,
        }
        print(
            f"3 hooks ({', '.join(three)}): one forward {one_forward['seconds']:.1f} s, three "
            f"streams {separate:.1f} s: {got['three_hooks']['ratio']:.2f}x"
        )
        return got
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def child(a) -> None:
    """One streamed run of --child-tokens tokens: its peak memory and disk as JSON on stdout."""
    model = load_model(device=a.device)
    out = Path(a.child_out)
    streamed(model, [a.hook], a.child_tokens, a.batch, out, a.window)
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"tokens": a.child_tokens, "peak_rss_mb": rss, "disk_mb": disk / 2**20}))


def memory(a) -> dict:
    rows = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child-tokens",
                    str(n),
                    "--child-out",
                    tmp + "/run",
                    "--hook",
                    a.hook,
                    "--batch",
                    str(a.batch),
                    "--device",
                    a.device,
                    *(["--window", str(a.window)] if a.window else []),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(
            f"{n:>12,} tokens: peak memory {rows[-1]['peak_rss_mb']:,.0f} MB, "
            f"disk {rows[-1]['disk_mb']:,.1f} MB"
        )
    first, last = rows[0], rows[-1]
    ratios = {k: last[k] / first[k] for k in ("peak_rss_mb", "disk_mb")}
    print(
        f"largest / smallest: memory {ratios['peak_rss_mb']:.2f}x, disk {ratios['disk_mb']:.2f}x "
        f"for {last['tokens'] / first['tokens']:.0f}x the tokens"
    )
    return {"sizes": rows, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--hook", default="resid_post.15")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, default=None, help="a stream's window_batches")
    ap.add_argument("--runs", nargs="*", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--no-three", dest="three", action="store_false", help="skip 3 hooks")
    ap.add_argument("--saelens-buffer", type=int, default=20, help="(c)'s n_batches_in_buffer")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--json", default=None)
    ap.add_argument("--child-tokens", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_tokens:
        child(a)
        return
    print(
        f"{time.strftime('%Y-%m-%d')}, device {a.device}, hook {a.hook}, batch {a.batch}, "
        f"BatchTopK k={K} {EXPANSION}x"
    )
    got = memory(a) if a.memory else speed(a)
    if a.json:
        Path(a.json).write_text(json.dumps(got, indent=2))


if __name__ == "__main__":
    main()
