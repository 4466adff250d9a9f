"""Capture activations with nnsight into a resumable store (see store.py for the layout): one
forward per batch for any number of hook points, stopped after the last; shards of whole
sequences written atomically."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data import PackedTokens, packed_corpus
from ..models import HookPoint, d_model, envoy, first_tensor, model_name, resolve_hook, underlying
from ..plumbing.files import atomic_save_npy, atomic_write_json, prepare_output
from ..plumbing.locks import writer_lock
from ..plumbing.version import saekit_version
from .resume import fold_done, open_or_start, plan_shards
from .store import DTYPES, FORMAT, ActivationStore, StoreError, hook_file


def _check_finite(acts: torch.Tensor, hook: str, seq_start: int) -> None:
    if not torch.isfinite(acts).all():
        bad = (~torch.isfinite(acts)).any(-1).nonzero()[0].tolist()
        raise StoreError(
            f"NaN/inf activations at hook {hook}, sequence {seq_start + bad[0]}, position "
            f"{bad[1]}: the model "
            "overflowed (try dtype=float32 for the model) or the input is corrupt; nothing was "
            "written for this shard"
        )


@torch.no_grad()
def forward_hooks(
    model, input_ids: torch.Tensor, hooks: Sequence[HookPoint], attention_mask=None
) -> list[torch.Tensor]:
    """One nnsight trace that reads every hook and stops after the last one. Returns [B, T, d]
    each."""
    order = sorted(range(len(hooks)), key=lambda i: hooks[i].order)
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    saved = [None] * len(hooks)
    with model.trace(inputs) as tracer:
        for i in order:
            env = envoy(model, hooks[i])
            value = env.input if hooks[i].io == "input" else env.output
            saved[i] = first_tensor(value).save()
        tracer.stop()
    return [first_tensor(s) for s in saved]


def store_bytes(packed: PackedTokens, n_hooks: int, dtype: str, width: int) -> int:
    """About how many bytes a capture of `packed` writes: activations, positions, tokens and
    document ids."""
    return packed.n_kept * (n_hooks * width * DTYPES[dtype].itemsize + 8) + packed.tokens.size * 8


def capture(
    model,
    packed: PackedTokens,
    hooks: str | Sequence[str],
    out: str | Path,
    n_tokens: int | None = None,
    batch_size: int = 16,
    dtype: str = "float16",
    shard_tokens: int = 32_768,
    overwrite: bool = False,
    progress: bool = True,
    corpus_info: dict | None = None,
) -> ActivationStore:
    """Run the model over `packed` sequences and store the activations at `hooks` under `out`.

    n_tokens: stop after at least this many kept positions (None: the whole packed corpus).
    A store already at `out` from the same model, hooks, dtype and tokens is resumed.
    Under torchrun (torch.distributed initialised) every rank calls this with the same arguments:
    rank 0 opens or starts the store, the shards still to do are dealt out round-robin (shard i of
    the to-do list to rank i % world), each rank writes only its own shard files and a completion
    record per shard, and rank 0 folds the records into the manifest, finishing it once every rank
    is done. A killed capture resumes with any number of ranks: the to-do list is whatever shard has
    no completion record.
    """
    if dtype not in DTYPES:
        raise StoreError(f"unknown store dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise StoreError("no hook points given; pass e.g. hooks='resid_post.15'")
    points = [resolve_hook(model, h) for h in hooks]
    out = Path(out)
    if n_tokens is not None:
        packed = _first_tokens(packed, n_tokens)
    manifest = _new_manifest(model, packed, hooks, dtype, shard_tokens, corpus_info)
    need = store_bytes(packed, len(points), dtype, d_model(model))
    with contextlib.ExitStack() as held:
        # rank 0 holds the store's writer lock for the whole job; a second writer is refused
        def start() -> dict:
            prepare_output(out, 0, "store folder")
            held.enter_context(writer_lock(out, "capture"))
            return open_or_start(out, manifest, packed, overwrite, need)

        manifest = distributed.on_rank0(start)
        if not manifest.get("complete"):
            _capture_shards(
                model, packed, hooks, points, out, manifest, batch_size, dtype, progress
            )
        store = ActivationStore(out)
        if distributed.rank() == 0:  # its files checked in full once: later opens read headers
            store.record_checked()
    return store


def _first_tokens(packed: PackedTokens, n_tokens: int) -> PackedTokens:
    """The first sequences of `packed` that hold at least n_tokens kept positions (all of them,
    with a warning, where it holds fewer)."""
    if n_tokens <= 0:
        raise StoreError(f"n_tokens must be positive, got {n_tokens}")
    if packed.n_kept < n_tokens and distributed.rank() == 0:
        warnings.warn(
            f"the corpus holds only {packed.n_kept:,} tokens (asked for {n_tokens:,}); "
            "capturing all of them",
            stacklevel=3,
        )
    return packed.head(packed.sequences_for(n_tokens))


# what a store's manifest keeps of the packed corpus's description
CORPUS_FIELDS = ("corpus", "split", "split_rule", "text_field", "n_documents", "sampling", "part")


def _new_manifest(model, packed, hooks, dtype, shard_tokens, corpus_info) -> dict:
    """The manifest a capture of `packed` starts (or must match, to be resumed)."""
    return {
        "format": FORMAT,
        "format_version": 1,
        "saekit_version": saekit_version(),
        "model": model_name(model),
        "hooks": hooks,
        "d_model": None,
        "dtype": dtype,
        "seq_len": packed.seq_len,
        "n_sequences": packed.n_sequences,
        "drop_bos": bool(packed.meta.get("drop_bos", True)),
        "bos_token_id": packed.bos_token_id,
        "pad_token_id": packed.pad_token_id,
        "corpus": {
            **{k: v for k, v in packed.meta.items() if k in CORPUS_FIELDS},
            **(corpus_info or {}),
        },
        "tokens_sha256": packed.sha256(),
        "shard_sequences": max(1, shard_tokens // packed.seq_len),
        "shards": [],
        "n_rows": 0,
        "complete": False,
    }


def kept_activations(
    model, packed: PackedTokens, start: int, end: int, points: list[HookPoint], device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward over sequences start..end of `packed`: the activations at every hook point at
    the kept positions ([n, d] each, on the model's device, checked finite), and those positions
    ([n, 2]: sequence, position)."""
    ids = torch.from_numpy(packed.tokens[start:end].astype(np.int64)).to(device)
    keep = torch.from_numpy(packed.keep[start:end])
    # padding only fills a row's tail, so causal attention keeps it out of every kept position
    acts = forward_hooks(model, ids, points)
    kept = []
    for point, a in zip(points, acts):
        a = a.detach()
        _check_finite(a, point.name, start)
        kept.append(a[keep.to(a.device)])
    seq_idx, pos_idx = keep.nonzero(as_tuple=True)
    return kept, torch.stack([seq_idx + start, pos_idx], 1).to(torch.int32)


def _capture_shards(
    model,
    packed: PackedTokens,
    hooks: list[str],
    points: list[HookPoint],
    out: Path,
    manifest: dict,
    batch_size: int,
    dtype: str,
    progress: bool,
) -> None:
    """This rank's share of the shards still to do, each written whole, then (rank 0) the
    manifest folded."""
    # a resumed store keeps its shard layout
    plan = plan_shards(packed.n_sequences, manifest["shard_sequences"])
    done = {s["index"] for s in manifest["shards"]}
    rank, world = distributed.rank(), distributed.world_size()
    todo = [(i, s, e) for i, (s, e) in enumerate(plan) if i not in done][rank::world]
    device = next(underlying(model).parameters()).device
    total = sum(int(packed.keep[s:e].sum()) for _, s, e in todo)
    who = f" (rank {rank} of {world})" if world > 1 else ""
    desc = f"capture {','.join(hooks)}{who}"
    bar = tqdm(total=total, unit="tok", desc=desc, disable=not progress, smoothing=0.1)
    try:
        for index, s, e in todo:
            parts: list[list[torch.Tensor]] = [[] for _ in points]
            pos_parts = []
            for b in range(s, e, batch_size):
                kept, pos = kept_activations(
                    model, packed, b, min(b + batch_size, e), points, device
                )
                for j, a in enumerate(kept):
                    parts[j].append(a.to("cpu").to(DTYPES[dtype]))
                pos_parts.append(pos)
                bar.update(pos.shape[0])
            acts = [torch.cat(p) for p in parts]
            _write_shard(out, index, (s, e), hooks, acts, torch.cat(pos_parts).numpy(), manifest)
            if rank == 0:
                manifest = fold_done(out, manifest, len(plan))
                bar.set_postfix(shards=f"{len(manifest['shards'])}/{len(plan)}")
    finally:
        bar.close()
    distributed.barrier()  # every rank's shards are written
    distributed.on_rank0(lambda: fold_done(out, manifest, len(plan)))


def _write_shard(out: Path, index: int, seqs, hooks, acts, pos: np.ndarray, manifest) -> None:
    """Shard `index` (sequences seqs = (start, end)): each hook's activations, the positions, and
    last its completion record, each file written atomically."""
    for h, arr in zip(hooks, acts):
        arr = arr.view(torch.uint16) if arr.dtype == torch.bfloat16 else arr
        atomic_save_npy(out / "shards" / f"{index:05d}.{hook_file(h)}.npy", arr.numpy())
    atomic_save_npy(out / "shards" / f"{index:05d}.pos.npy", pos)
    # written last: the shard is whole
    atomic_write_json(
        out / "shards" / f"{index:05d}.done.json",
        {
            "index": index,
            "seq_start": seqs[0],
            "seq_end": seqs[1],
            "n_rows": int(pos.shape[0]),
            "d_model": int(acts[0].shape[-1]),
            "tokens_sha256": manifest["tokens_sha256"],
        },
    )


def capture_splits(
    model,
    hook: str,
    out: str | Path,
    train_tokens: int,
    test_tokens: int,
    seq_len: int = 128,
    batch_size: int = 16,
    corpus: str | None = None,
    progress: bool = True,
    seed: int = 0,
    calib_tokens: int = 0,
):
    """Capture the bundled (or named) corpus's train and test splits at `hook` into out/store_train
    and out/store_test, each a sample of documents from across its split (seeded random order);
    finished stores are reused and interrupted ones resumed. Returns (train, test).

    calib_tokens > 0 also captures out/store_calib from the train split's documents that come next
    in the same random order, i.e. text the SAE is not trained on (the store to calibrate theta on),
    and returns (train, test, calib)."""
    out = Path(out)
    split = lambda name, n: packed_corpus(
        model.tokenizer, corpus, split=name, seq_len=seq_len, max_tokens=n, seed=seed
    )
    train_packed = split("train", train_tokens + calib_tokens + (seq_len if calib_tokens else 0))
    n_train = train_packed.sequences_for(train_tokens)
    parts = [
        ("train", train_packed.head(n_train), train_tokens),
        ("test", split("test", test_tokens), test_tokens),
    ]
    if calib_tokens:
        calib = train_packed.sequences(n_train, train_packed.n_sequences)
        parts.append(("calib", calib, calib_tokens))
    return tuple(
        capture(
            model, packed, hook, out / f"store_{name}", n, batch_size=batch_size, progress=progress
        )
        for name, packed, n in parts
    )


def capture_throughput(
    model,
    packed: PackedTokens,
    hook: str,
    batch_size: int = 16,
    n_batches_: int = 4,
    stop: bool = True,
) -> float:
    """Tokens/s of the capture forward (stop=True) or of a full forward (stop=False); for
    benchmarks."""
    point = resolve_hook(model, hook)
    ids = torch.from_numpy(packed.tokens[:batch_size].astype(np.int64)).to(
        next(underlying(model).parameters()).device
    )

    def run():
        if stop:
            forward_hooks(model, ids, [point])
        else:
            with torch.no_grad():
                underlying(model)(ids)

    run()  # warm-up
    t = time.perf_counter()
    for _ in range(n_batches_):
        run()
    return n_batches_ * ids.numel() / (time.perf_counter() - t)
