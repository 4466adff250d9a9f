"""The command line's building blocks: number types that name the flag and rule of a bad value,
defaults read from the library's signatures, the help formatter, and the argument groups several
commands share."""

from __future__ import annotations

import argparse
import inspect
import math


def default_of(fn, name: str):
    """The default of parameter `name` of library function `fn`."""
    return inspect.signature(fn).parameters[name].default


def enc_init_norm_arg(v: str) -> float | str:
    """--enc-init-norm: 'paper' or a positive number (SAEConfig.enc_init_norm)."""
    if v == "paper":
        return v
    try:
        norm = float(v)
    except ValueError:
        norm = 0.0
    if not (math.isfinite(norm) and norm > 0):
        raise argparse.ArgumentTypeError(
            f"enc-init-norm must be 'paper' or a positive number (got {v!r})"
        )
    return norm


def _number(kind, least: float, strict: bool, what: str):
    """An argparse type: a number of `kind` at least (strict: above) `least`, with a message
    naming the rule."""

    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            x = None
        if x is None or not math.isfinite(x) or not (x > least if strict else x >= least):
            raise argparse.ArgumentTypeError(f"must be {what} (got {v!r})")
        return x

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, False, "a whole number of at least 1")
count_int = _number(int, 0, False, "a whole number of 0 or more")
positive_float = _number(float, 0, True, "a finite number above 0")


# -- the parser ------------------------------------------------------------------------------------


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default."""


def _sub(sub, name: str, help: str, fn):
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
    p.set_defaults(fn=fn)
    return p


def _add_corpus_args(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    """The corpus and how it is packed; sampling: the document order's own flags (a stream from
    the model orders its documents by --seed)."""
    from ..data import packed_corpus

    p.add_argument(
        "--corpus",
        default=None,
        help="'bundled' (None), a local .txt/.jsonl/.parquet file or folder, or a hub data set",
    )
    p.add_argument(
        "--split",
        default=default_of(packed_corpus, "split"),
        help="split of the corpus (bundled: train, test or all)",
    )
    p.add_argument(
        "--text-field",
        default=default_of(packed_corpus, "text_field"),
        help="column holding the text",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=default_of(packed_corpus, "seq_len"),
        help="tokens per packed sequence, BOS included",
    )
    if not sampling:
        return
    p.add_argument(
        "--sample-seed",
        type=count_int,
        default=default_of(packed_corpus, "seed"),
        help="seed of the random document order (documents are drawn from across the whole split)",
    )
    p.add_argument(
        "--no-shuffle",
        action="store_true",
        help="pack documents in corpus order instead (the first N tokens of the split)",
    )


def _add_training_args(p, archs, ks, l1, tokens, checkpoint_every, stream=False) -> None:
    """train's and sweep's flags: the data, the SAEs (each --arch at every level), the run.
    stream: the data may instead come from the running model (train)."""
    if stream:
        _add_stream_args(p)
    else:
        p.add_argument(
            "--store",
            required=True,
            help="activation store folder, or a .npy/.safetensors [N, d] file",
        )
        p.add_argument(
            "--hook", default=None, help="hook point to train on (None: the store's first)"
        )
    _add_sae_args(p, archs, ks, l1)
    _add_run_args(p, tokens, checkpoint_every)
    p.add_argument(
        "--out",
        required=True,
        help="output folder (one subfolder per SAE; checkpoints to resume from)",
    )


def _add_stream_args(p) -> None:
    """train's data: a store, or activations from the running model (--model, one --hook or more,
    a corpus split), nothing written but the SAEs."""
    from ..train.stream import ModelSource

    p.add_argument(
        "--store",
        default=None,
        help="activation store folder, or a .npy/.safetensors [N, d] file (else: --model)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="train from this running model instead of a store ('embedded': the bundled "
        "SmolLM2-135M-Instruct; a hub id or local folder)",
    )
    p.add_argument(
        "--hook",
        action="append",
        default=None,
        help="hook point (with --model: repeat it to train SAEs at several hooks from one "
        "forward; with --store: one, None: the store's first)",
    )
    _add_corpus_args(p, sampling=False)
    p.add_argument(
        "--window-batches",
        type=positive_int,
        default=default_of(ModelSource, "window_batches"),
        help="with --model: batches of tokens mixed in one shuffle window (default: as many as "
        "hold 131,072 tokens)",
    )
    p.add_argument(
        "--forward-batch",
        type=positive_int,
        default=default_of(ModelSource, "forward_batch"),
        help="with --model: sequences per forward pass",
    )
    p.add_argument(
        "--model-dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="with --model: the model's dtype (None: as loaded)",
    )


def _add_sae_args(p, archs, ks, l1) -> None:
    from ..sae import ARCHITECTURES, NORMALIZATIONS, SAEConfig

    p.add_argument(
        "--arch",
        nargs="+",
        default=archs,
        choices=list(ARCHITECTURES),
        help="architectures, each trained at every level",
    )
    p.add_argument(
        "--k",
        nargs="+",
        type=positive_int,
        default=ks,
        help="levels of k (JumpReLU: its target L0)",
    )
    p.add_argument(
        "--l1-coeff", nargs="+", type=positive_float, default=l1, help="levels of ReLU-L1's penalty"
    )
    p.add_argument(
        "--expansion",
        type=positive_int,
        default=8,
        help="latents per input dimension (d_sae = expansion * d_in)",
    )
    p.add_argument(
        "--normalize",
        default=SAEConfig.normalize,
        choices=NORMALIZATIONS,
        help="input normalisation: per token (the paper's), one dataset-wide scale, or none",
    )
    p.add_argument(
        "--enc-init-norm",
        default=SAEConfig.enc_init_norm,
        type=enc_init_norm_arg,
        help="starting norm of each encoder column: 'paper' (sqrt(2 d_in / d_sae), as the "
        "BatchTopK paper's code draws it) or a number (1: the decoder transposed)",
    )


def _add_run_args(p, tokens, checkpoint_every) -> None:
    from ..train import LR_BASE, TrainConfig
    from ..train.config import PRECISIONS
    from ..train.graphs import MODES as GRAPH_MODES

    p.add_argument(
        "--tokens",
        type=positive_int,
        default=tokens,
        help="training tokens (epochs over the store if larger)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=TrainConfig.batch_size,
        help="tokens per step (the global batch under torchrun)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=TrainConfig.lr,
        help=f"learning rate (None: {LR_BASE:g} / sqrt(d_sae / 2^14), larger for small "
        "dictionaries)",
    )
    p.add_argument(
        "--warmup-steps",
        type=count_int,
        default=TrainConfig.warmup_steps,
        help="linear warm-up steps",
    )
    p.add_argument(
        "--seed",
        type=count_int,
        default=TrainConfig.seed,
        help="seed of the initialisation and the batch order",
    )
    p.add_argument(
        "--checkpoint-every",
        type=count_int,
        default=checkpoint_every,
        help="steps between checkpoints (0: at the end)",
    )
    p.add_argument(
        "--device", default=TrainConfig.device, help="cpu, cuda, ... (None: cuda where available)"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=list(PRECISIONS),
        help="matrix products in training: 'bf16' autocast, 'fp32', or 'auto' (bf16 where "
        "the device multiplies bf16 in hardware: a CUDA GPU; a CPU with AVX-512 BF16 "
        "for an SAE whose batch x d_in x d_sae is at least 2^25)",
    )
    p.add_argument(
        "--step-graphs",
        default=TrainConfig.step_graphs,
        choices=GRAPH_MODES,
        help="'cuda': record each SAE's step once as CUDA graphs and replay it (one GPU)",
    )


def _add_mismatch_arg(p) -> None:
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="use an SAE on activations of another hook or model on purpose (checked and refused "
        "otherwise); the hook read must still be in the store",
    )


def _add_eval_args(p, evaluate) -> None:
    p.add_argument(
        "--ce-tokens",
        type=positive_int,
        default=default_of(evaluate, "ce_tokens"),
        help="scored positions for the CE metrics, from sequences drawn across the whole store",
    )
    p.add_argument(
        "--model", default=None, help="model for the CE metrics (None: the store's model)"
    )
    p.add_argument(
        "--no-ce", action="store_true", help="skip the downstream metrics (no model needed)"
    )


def eval_list(text: str) -> list[str]:
    """--evals: a comma-separated list of saekit bench's evaluations."""
    from ..bench.output import BenchError
    from ..bench.run import parse_evals

    try:
        return parse_evals(text)
    except BenchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
