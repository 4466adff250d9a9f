"""The parser: one small function per command, each adding its flags; every choice and default is
read from the library (its configs, registry and signatures)."""

from __future__ import annotations

import argparse
import dataclasses

from . import commands
from .args import (
    _add_corpus_args,
    _add_eval_args,
    _add_mismatch_arg,
    _add_training_args,
    _Formatter,
    _sub,
    count_int,
    default_of,
    eval_list,
    positive_float,
    positive_int,
)

MODEL_HELP = "hub id or local folder (None: the embedded SmolLM2-135M-Instruct)"
DEVICE_HELP = "cpu, cuda, ... (None: cuda where available)"


def add_capture(sub) -> None:
    from ..activations import DTYPES, capture

    c = _sub(sub, "capture", "capture activations into a resumable store", commands.cmd_capture)
    c.add_argument("--model", default=None, help=MODEL_HELP)
    c.add_argument(
        "--hook", action="append", required=True, help="e.g. resid_post.15 (repeat for several)"
    )
    c.add_argument("--tokens", type=positive_int, default=200_000, help="tokens to capture")
    c.add_argument("--out", required=True, help="store folder (a killed capture resumes there)")
    c.add_argument(
        "--batch-size",
        type=positive_int,
        default=default_of(capture, "batch_size"),
        help="sequences per forward pass",
    )
    c.add_argument(
        "--dtype", default=default_of(capture, "dtype"), choices=list(DTYPES), help="stored dtype"
    )
    c.add_argument(
        "--keep-bos", action="store_true", help="keep BOS positions (dropped by default)"
    )
    c.add_argument("--overwrite", action="store_true", help="replace a finished store at --out")
    c.add_argument(
        "--shard-tokens",
        type=positive_int,
        default=default_of(capture, "shard_tokens"),
        help="tokens per shard (the unit of resuming and of the work dealt to torchrun's ranks)",
    )
    c.add_argument("--device", default=None, help=DEVICE_HELP)
    _add_corpus_args(c)


def add_train(sub) -> None:
    from ..train import TrainConfig

    t = _sub(
        sub,
        "train",
        "train SAE(s) on a store (or .npy/.safetensors), one read per batch, or straight from "
        "the running model (--model)",
        commands.cmd_train,
    )
    _add_training_args(
        t, ["batchtopk"], [32], [5.0], 1_000_000, TrainConfig.checkpoint_every, stream=True
    )
    t.add_argument(
        "--no-resume", action="store_true", help="start afresh even if --out holds checkpoints"
    )
    t.add_argument(
        "--distributed",
        action="store_true",
        help="train with torch.distributed DDP (launch with torchrun --nproc_per_node N -m saekit "
        "train ...; implied under torchrun); --batch-size is the global batch",
    )


def add_eval(sub) -> None:
    from ..metrics import evaluate

    e = _sub(
        sub,
        "eval",
        "evaluate a saved SAE: reconstruction, sparsity, downstream CE, with 95%% intervals",
        commands.cmd_eval,
    )
    e.add_argument("sae_dir", help="SAE folder (saekit, SAELens or sparsify)")
    e.add_argument(
        "--store",
        required=True,
        help="activation store to evaluate on (its tokens feed the CE metrics)",
    )
    e.add_argument("--hook", default=None, help="hook point (None: the SAE's)")
    e.add_argument(
        "--mode",
        default=None,
        choices=["threshold", "batch"],
        help="BatchTopK's code: threshold (theta; None means this) "
        "or batch (top B*k of each batch)",
    )
    e.add_argument(
        "--tokens",
        type=positive_int,
        default=default_of(evaluate, "n_tokens"),
        help="activations for reconstruction/sparsity",
    )
    _add_eval_args(e, evaluate)
    e.add_argument("--device", default=None, help=DEVICE_HELP)
    e.add_argument("--json", action="store_true", help="print the whole result as JSON")
    _add_mismatch_arg(e)
    e.add_argument(
        "--out",
        default=None,
        help="also write the result (with per-sequence sums) to this JSON file",
    )


def add_calibrate(sub) -> None:
    from ..calibrate import calibrate

    cal = _sub(
        sub,
        "calibrate",
        "set a BatchTopK SAE's theta so threshold-mode L0 on a store equals a target",
        commands.cmd_calibrate,
    )
    cal.add_argument(
        "sae_dir", help="BatchTopK or Matryoshka SAE folder (theta is written back into it)"
    )
    cal.add_argument(
        "--store",
        required=True,
        help="store to calibrate on (use one that is not your evaluation store)",
    )
    cal.add_argument(
        "--target-l0",
        type=positive_float,
        default=default_of(calibrate, "target_l0"),
        help="mean latents per token (None: the SAE's k)",
    )
    cal.add_argument(
        "--tokens",
        type=positive_int,
        default=default_of(calibrate, "n_tokens"),
        help="rows of the store to use (None: all)",
    )
    cal.add_argument("--hook", default=None, help="hook point to read (None: the SAE's)")
    _add_mismatch_arg(cal)


def add_compare(sub) -> None:
    from ..metrics import CE_STATS, RECON_STATS

    cmp_ = _sub(
        sub,
        "compare",
        "paired difference of two evaluations (saekit eval --out) with 95%% intervals",
        commands.cmd_compare,
    )
    cmp_.add_argument("eval_a", help="eval JSON of SAE A")
    cmp_.add_argument("eval_b", help="eval JSON of SAE B (on the same store)")
    cmp_.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        choices=[*RECON_STATS, *CE_STATS],
        help="metrics to compare (None: all that both files have)",
    )
    cmp_.add_argument(
        "--names", nargs=2, default=None, help="labels of A and B (None: their architectures)"
    )
    cmp_.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="show evaluations of different data, hooks or modes side by side, unpaired "
        "(refused otherwise)",
    )


def add_sweep(sub) -> None:
    from ..metrics import evaluate

    w = _sub(
        sub,
        "sweep",
        "train several architectures/sparsities on one stream, evaluate each, one table",
        commands.cmd_sweep,
    )
    _add_training_args(
        w, ["batchtopk", "topk", "jumprelu"], [16, 32, 64], [1.0, 3.0, 10.0], 2_000_000, 200
    )
    w.add_argument("--eval-store", default=None, help="held-out store (None: --store)")
    w.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=default_of(evaluate, "n_tokens"),
        help="activations for each SAE's reconstruction/sparsity",
    )
    _add_eval_args(w, evaluate)
    _add_mismatch_arg(w)


def add_sweep_report(sub) -> None:
    sr = _sub(
        sub,
        "sweep-report",
        "tables and figures of one or several (e.g. one per seed) sweeps",
        commands.cmd_sweep_report,
    )
    sr.add_argument("sweep_dirs", nargs="+", help="sweep output folders (saekit sweep --out)")
    sr.add_argument(
        "--out",
        required=True,
        help="folder for sweep.csv, by_k.md, differences.md, frontier.html, ...",
    )
    sr.add_argument(
        "--title",
        default=None,
        help="figure title (None: model, hook and architectures from the SAEs)",
    )


def add_report(sub) -> None:
    r = _sub(
        sub,
        "report",
        "write RUN_DIR/report.html (self-contained figures of a demo run)",
        commands.cmd_report,
    )
    r.add_argument("run_dir", help="a demo's output folder")
    r.add_argument(
        "--latents",
        type=count_int,
        nargs="+",
        default=None,
        help="latents to give a feature dashboard (None: six, from dense to rare)",
    )


def add_bench(sub) -> None:
    from ..bench.run import EVALS

    b = _sub(
        sub,
        "bench",
        "SAEBench's core, absorption and sparse-probing evaluations, offline, in its JSON format",
        commands.cmd_bench,
    )
    b.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR", help="SAE folders (one model)")
    b.add_argument(
        "--evals",
        type=eval_list,
        default=list(EVALS),
        help=f"comma-separated, from {','.join(EVALS)}",
    )
    b.add_argument("--model", default=None, help=MODEL_HELP)
    b.add_argument("--out", default="runs/bench", help="results folder (OUT/<eval type>/...)")
    b.add_argument(
        "--corpus", default=None, help="text for core and sparse probing (None: bundled)"
    )
    b.add_argument("--overwrite", action="store_true", help="compute results already written again")
    _add_mismatch_arg(b)


def add_export_store(sub) -> None:
    from ..activations import export_store

    x = _sub(
        sub,
        "export-store",
        "write an activation store in another tool's format",
        commands.cmd_export_store,
    )
    x.add_argument("store", help="store folder (saekit store or SAELens cache)")
    x.add_argument("out", help="new folder to write")
    x.add_argument(
        "--format",
        default=default_of(export_store, "format"),
        choices=["saelens"],
        help="format to write",
    )
    x.add_argument(
        "--context-size",
        type=positive_int,
        default=None,
        help="tokens per SAELens row (None: the store's positions per sequence)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def add_notebooks(sub) -> None:
    nb = _sub(
        sub,
        "notebooks",
        "copy the notebook series into a folder to work in",
        commands.cmd_notebooks,
    )
    nb.add_argument("dir", help="folder to copy the notebooks into (created if needed)")
    nb.add_argument("--overwrite", action="store_true", help="replace notebooks already in DIR")


DEMO_HELP = {
    "out": "results folder",
    "hook": "hook point of the embedded model",
    "tokens": "training tokens to capture",
    "calib_tokens": "tokens of further training-split documents to calibrate theta on",
    "eval_tokens": "held-out tokens to evaluate on",
    "train_tokens": "SAE training tokens (epochs over the store)",
    "k": "latents per token",
    "expansion": "latents per input dimension",
    "batch_size": "tokens per training step",
    "lr": "learning rate (None: TrainConfig's rule for the dictionary size)",
    "ce_tokens": "scored positions for the CE metrics",
    "device": DEVICE_HELP,
}


def add_demo(sub) -> None:
    from ..jobs.demo import DemoConfig

    d = _sub(
        sub, "demo", "the main job on the embedded model and bundled corpus", commands.cmd_demo
    )
    for f in dataclasses.fields(DemoConfig):
        kind = {
            "int": count_int if f.name == "calib_tokens" else positive_int,
            "float | None": positive_float,
        }.get(str(f.type))
        d.add_argument(
            f"--{f.name.replace('_', '-')}",
            default=f.default,
            help=DEMO_HELP[f.name],
            **({"type": kind} if kind else {}),
        )


# in the order `saekit --help` lists them
COMMANDS = (
    add_capture,
    add_train,
    add_eval,
    add_calibrate,
    add_compare,
    add_sweep,
    add_sweep_report,
    add_report,
    add_bench,
    add_export_store,
    add_notebooks,
    add_demo,
)


def build_parser(description: str = "the saekit command line") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saekit", description=description, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in COMMANDS:
        add(sub)
    return p
