"""Capture activations with nnsight into a resumable on-disk store, and serve shuffled batches from it.

Store layout (DIR):
    manifest.json            what was captured and which shards are complete (rewritten atomically)
    tokens.npy, doc_ids.npy  the packed token ids [n_seq, seq_len] and their document index
    shards/NNNNN.pos.npy     [rows, 2] int32 (sequence, position) of every stored activation row
    shards/NNNNN.HOOK.npy    [rows, d_model] activations (bf16 is stored as uint16 bits)
A shard covers a fixed range of sequences, so an interrupted capture resumes at the first missing
shard with no token lost or duplicated.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .data import PackedTokens
from .models import HookPoint, envoy, first_tensor, model_name, resolve_hook, underlying

FORMAT = "saekit-activations"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class StoreError(RuntimeError):
    """An activation store that is missing, truncated or inconsistent with its manifest."""


# ---------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, lambda fh: np.save(fh, array))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(json.dumps(obj, indent=2).encode()))


def _hook_file(hook: str) -> str:
    return hook.replace("/", "_")


# ---------------------------------------------------------------------------------------------
# capture


def _check_finite(acts: torch.Tensor, hook: str, seq_start: int) -> None:
    if not torch.isfinite(acts).all():
        bad = (~torch.isfinite(acts)).any(-1).nonzero()[0].tolist()
        raise StoreError(
            f"NaN/inf activations at hook {hook}, sequence {seq_start + bad[0]}, position {bad[1]}: the model "
            f"overflowed (try dtype=float32 for the model) or the input is corrupt; nothing was written for this shard"
        )


@torch.no_grad()
def forward_hooks(model, input_ids: torch.Tensor, hooks: Sequence[HookPoint], attention_mask=None) -> list[torch.Tensor]:
    """One nnsight trace that reads every hook and stops after the last one. Returns [B, T, d] each."""
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


def _plan_shards(n_seq: int, shard_sequences: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_sequences, n_seq)) for s in range(0, n_seq, shard_sequences)]


def capture(model, packed: PackedTokens, hooks: str | Sequence[str], out: str | Path, n_tokens: int | None = None,
            batch_size: int = 16, dtype: str = "float16", shard_tokens: int = 32_768, overwrite: bool = False,
            progress: bool = True, corpus_info: dict | None = None) -> "ActivationStore":
    """Run the model over `packed` sequences and store the activations at `hooks` under `out`.

    n_tokens: stop after at least this many kept positions (None: the whole packed corpus).
    A store already at `out` from the same model, hooks, dtype and tokens is resumed.
    """
    if dtype not in DTYPES:
        raise StoreError(f"unknown store dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise StoreError("no hook points given; pass e.g. hooks='resid_post.15'")
    points = [resolve_hook(model, h) for h in hooks]
    out = Path(out)
    if n_tokens is not None:
        if n_tokens <= 0:
            raise StoreError(f"n_tokens must be positive, got {n_tokens}")
        n_seq = packed.sequences_for(n_tokens)
        if packed.n_kept < n_tokens:
            warnings.warn(f"the corpus holds only {packed.n_kept:,} tokens (asked for {n_tokens:,}); capturing all of them")
        packed = packed.head(n_seq)
    seq_len = packed.seq_len
    shard_sequences = max(1, shard_tokens // seq_len)
    manifest = {
        "format": FORMAT, "format_version": 1, "saekit_version": __version__,
        "model": model_name(model), "hooks": hooks, "d_model": None, "dtype": dtype,
        "seq_len": seq_len, "n_sequences": packed.n_sequences, "drop_bos": bool(packed.meta.get("drop_bos", True)),
        "bos_token_id": packed.bos_token_id, "pad_token_id": packed.pad_token_id,
        "corpus": {**{k: v for k, v in packed.meta.items() if k in ("corpus", "split", "text_field", "n_documents", "sampling", "part")},
                   **(corpus_info or {})},
        "tokens_sha256": packed.sha256(), "shard_sequences": shard_sequences,
        "shards": [], "n_rows": 0, "complete": False,
    }
    mpath = out / "manifest.json"
    if mpath.exists() and not overwrite:
        old = _read_manifest(out)
        keys = ("model", "hooks", "dtype", "seq_len", "tokens_sha256")  # what was captured, not how it was split
        diff = [k for k in keys if old.get(k) != manifest[k]]
        if diff:
            raise StoreError(
                f"{out} already holds a different capture (differs in: {', '.join(diff)}). Choose another output "
                f"folder, or pass overwrite=True (--overwrite) to replace it."
            )
        manifest = old
        if manifest.get("complete"):
            return ActivationStore(out)
    else:
        if overwrite and out.exists():
            for p in list(out.glob("shards/*.npy")) + [mpath]:
                p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out / "tokens.npy", packed.tokens)
        atomic_save_npy(out / "doc_ids.npy", packed.doc_ids)
        atomic_write_json(mpath, manifest)
    for stale in out.glob("shards/.*.tmp"):
        stale.unlink(missing_ok=True)

    done = {s["index"] for s in manifest["shards"]}
    plan = _plan_shards(packed.n_sequences, manifest["shard_sequences"])  # a resumed store keeps its shard layout
    todo = [(i, s, e) for i, (s, e) in enumerate(plan) if i not in done]
    device = next(underlying(model).parameters()).device
    total = sum(int(packed.keep[s:e].sum()) for _, s, e in todo)
    bar = tqdm(total=total, unit="tok", desc=f"capture {','.join(hooks)}", disable=not progress, smoothing=0.1)
    store_dtype = DTYPES[dtype]
    try:
        for index, s, e in todo:
            parts: list[list[torch.Tensor]] = [[] for _ in points]
            pos_parts = []
            for b in range(s, e, batch_size):
                be = min(b + batch_size, e)
                ids = torch.from_numpy(packed.tokens[b:be].astype(np.int64)).to(device)
                keep = torch.from_numpy(packed.keep[b:be])
                # padding only fills a row's tail, so causal attention keeps it out of every kept position
                acts = forward_hooks(model, ids, points)
                for j, a in enumerate(acts):
                    a = a.detach().to("cpu")
                    _check_finite(a, hooks[j], b)
                    parts[j].append(a[keep].to(store_dtype))
                seq_idx, pos_idx = keep.nonzero(as_tuple=True)
                pos_parts.append(torch.stack([seq_idx + b, pos_idx], 1).to(torch.int32))
                bar.update(int(keep.sum()))
            pos = torch.cat(pos_parts).numpy()
            d = int(parts[0][0].shape[-1])
            for j, h in enumerate(hooks):
                arr = torch.cat(parts[j])
                arr = arr.view(torch.uint16) if dtype == "bfloat16" else arr
                atomic_save_npy(out / "shards" / f"{index:05d}.{_hook_file(h)}.npy", arr.numpy())
            atomic_save_npy(out / "shards" / f"{index:05d}.pos.npy", pos)
            manifest["d_model"] = d
            manifest["shards"].append({"index": index, "seq_start": s, "seq_end": e, "n_rows": int(pos.shape[0])})
            manifest["shards"].sort(key=lambda x: x["index"])
            manifest["n_rows"] = sum(x["n_rows"] for x in manifest["shards"])
            manifest["complete"] = len(manifest["shards"]) == len(plan)
            atomic_write_json(mpath, manifest)
            bar.set_postfix(shards=f"{len(manifest['shards'])}/{len(plan)}")
    finally:
        bar.close()
    return ActivationStore(out)


# ---------------------------------------------------------------------------------------------
# reading


def _read_manifest(path: Path) -> dict:
    mpath = Path(path) / "manifest.json"
    if not mpath.exists():
        raise StoreError(f"{path} is not an activation store: no manifest.json there (make one with `saekit capture`)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{mpath} is corrupt ({e}); re-run the capture into a new folder") from e
    if m.get("format") != FORMAT:
        raise StoreError(f"{mpath} is not a saekit activation manifest (format={m.get('format')!r})")
    return m


@dataclass
class _Chunk:
    shard: int
    start: int
    end: int


def capture_splits(model, hook: str, out: str | Path, train_tokens: int, test_tokens: int, seq_len: int = 128,
                   batch_size: int = 16, corpus: str | None = None, progress: bool = True, seed: int = 0,
                   calib_tokens: int = 0):
    """Capture the bundled (or named) corpus's train and test splits at `hook` into out/store_train and
    out/store_test, each a sample of documents from across its split (seeded random order); finished
    stores are reused and interrupted ones resumed. Returns (train, test).

    calib_tokens > 0 also captures out/store_calib from the train split's documents that come next in the
    same random order, i.e. text the SAE is not trained on (the store to calibrate theta on), and returns
    (train, test, calib)."""
    from .data import packed_corpus

    out = Path(out)
    train_packed = packed_corpus(model.tokenizer, corpus, split="train", seq_len=seq_len,
                                 max_tokens=train_tokens + calib_tokens + (seq_len if calib_tokens else 0), seed=seed)
    n_train = train_packed.sequences_for(train_tokens)
    parts = [("train", train_packed.head(n_train), train_tokens),
             ("test", packed_corpus(model.tokenizer, corpus, split="test", seq_len=seq_len, max_tokens=test_tokens,
                                    seed=seed), test_tokens)]
    if calib_tokens:
        parts.append(("calib", train_packed.sequences(n_train, train_packed.n_sequences), calib_tokens))
    return tuple(capture(model, packed, hook, out / f"store_{name}", n_tokens=n, batch_size=batch_size,
                         progress=progress) for name, packed, n in parts)


class ActivationStore:
    """A captured store: validated on open, read memory-mapped, served as shuffled batches."""

    def __init__(self, path: str | Path, hook: str | None = None):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.hooks: list[str] = list(self.manifest["hooks"])
        if hook is not None and hook not in self.hooks:
            raise StoreError(f"hook '{hook}' is not in store {self.path}; it holds {self.hooks}")
        self.hook = hook or self.hooks[0]
        self.dtype: str = self.manifest["dtype"]
        self.d_model: int = int(self.manifest["d_model"] or 0)
        self.shards: list[dict] = list(self.manifest["shards"])
        if not self.shards:
            raise StoreError(f"store {self.path} is empty: its capture wrote no shard yet (resume it with the same command)")
        if not self.manifest.get("complete"):
            warnings.warn(f"store {self.path} is incomplete ({len(self.shards)} shards); reading what is there. "
                          f"Re-run the same capture to finish it.")
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._validate()

    # -- validation --------------------------------------------------------------------------
    def _open(self, shard: dict, what: str) -> np.ndarray:
        key = (shard["index"], what)
        if key not in self._maps:
            f = self.path / "shards" / f"{shard['index']:05d}.{_hook_file(what)}.npy"
            if not f.exists():
                raise StoreError(f"store {self.path}: shard file {f.name} is missing; the manifest lists shard "
                                 f"{shard['index']}. Restore it or re-capture into a new folder.")
            try:
                self._maps[key] = np.load(f, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise StoreError(f"store {self.path}: shard file {f.name} is truncated or corrupt ({e}). "
                                 f"Delete the folder and capture again.") from e
        return self._maps[key]

    def _validate(self) -> None:
        want_np = np.dtype(_NP_DTYPES[self.dtype])
        total = 0
        for sh in self.shards:
            pos = self._open(sh, "pos")
            if pos.shape != (sh["n_rows"], 2):
                raise StoreError(f"store {self.path}: shard {sh['index']} positions have shape {pos.shape}, "
                                 f"manifest says {sh['n_rows']} rows")
            for h in self.hooks:
                a = self._open(sh, h)
                if a.shape != (sh["n_rows"], self.d_model) or a.dtype != want_np:
                    raise StoreError(
                        f"store {self.path}: shard {sh['index']} of hook {h} has shape {a.shape} and dtype {a.dtype}; "
                        f"the manifest says ({sh['n_rows']}, {self.d_model}) {self.dtype}. The store is inconsistent: "
                        f"capture again into a new folder.")
            total += sh["n_rows"]
        if total != self.manifest["n_rows"]:
            raise StoreError(f"store {self.path}: shards hold {total} rows, manifest says {self.manifest['n_rows']}")
        for name in ("tokens.npy", "doc_ids.npy"):
            if not (self.path / name).exists():
                raise StoreError(f"store {self.path}: {name} is missing")

    # -- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def tokens(self) -> np.ndarray:
        """[n_seq, seq_len] token ids, memory-mapped."""
        return np.load(self.path / "tokens.npy", mmap_mode="r")

    @property
    def doc_ids(self) -> np.ndarray:
        return np.load(self.path / "doc_ids.npy", mmap_mode="r")

    def positions(self) -> np.ndarray:
        """[n_rows, 2] (sequence, position) of every row in store order."""
        return np.concatenate([np.asarray(self._open(sh, "pos")) for sh in self.shards])

    def _to_torch(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(arr, copy=True))
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def rows(self, start: int, end: int, hook: str | None = None) -> torch.Tensor:
        """Rows [start, end) in store order, as stored dtype."""
        hook = hook or self.hook
        out, offset = [], 0
        for sh in self.shards:
            n = sh["n_rows"]
            s, e = max(start - offset, 0), min(end - offset, n)
            if s < e:
                out.append(self._to_torch(self._open(sh, hook)[s:e]))
            offset += n
        return torch.cat(out) if out else torch.empty(0, self.d_model, dtype=DTYPES[self.dtype])

    def take(self, rows: np.ndarray, hook: str | None = None) -> torch.Tensor:
        """Rows at the given increasing store-order indices, as stored dtype."""
        hook = hook or self.hook
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.cumsum([0] + [sh["n_rows"] for sh in self.shards])
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        out = [self._to_torch(self._open(self.shards[i], hook)[rows[shard_of == i] - starts[i]])
               for i in np.unique(shard_of)]
        return torch.cat(out) if out else torch.empty(0, self.d_model, dtype=DTYPES[self.dtype])

    def load(self, hook: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole store for one hook in memory [n_rows, d_model] (the in-memory mode for small runs)."""
        return self.rows(0, len(self), hook).to(dtype)

    def batches(self, batch_size: int, hook: str | None = None, shuffle: bool = True, seed: int = 0,
                epochs: int = 1, buffer_rows: int = 262_144, chunk_rows: int = 4096, drop_last: bool = False,
                dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                return_positions: bool = False, rank: int = 0, world_size: int = 1) -> Iterator:
        """Shuffled batches [batch_size, d_model] covering every row once per epoch with bounded RAM.

        Rows are read in chunks of `chunk_rows`; chunk order is shuffled across shards, `buffer_rows`
        worth of chunks are loaded and their rows shuffled together. With world_size > 1 each rank
        reads its own chunks. return_positions adds the [B, 2] (sequence, position) of each row.
        """
        hook = hook or self.hook
        if hook not in self.hooks:
            raise StoreError(f"hook '{hook}' is not in store {self.path}; it holds {self.hooks}")
        chunks = [_Chunk(i, s, min(s + chunk_rows, sh["n_rows"]))
                  for i, sh in enumerate(self.shards) for s in range(0, sh["n_rows"], chunk_rows)]
        per_buffer = max(1, buffer_rows // chunk_rows)
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(chunks), generator=g).tolist() if shuffle else list(range(len(chunks)))
            mine = [chunks[i] for i in order][rank::world_size]
            carry_x, carry_p = None, None
            for b in range(0, len(mine), per_buffer):
                group = mine[b:b + per_buffer]
                xs = [self._to_torch(self._open(self.shards[c.shard], hook)[c.start:c.end]) for c in group]
                ps = [torch.from_numpy(np.array(self._open(self.shards[c.shard], "pos")[c.start:c.end]))
                      for c in group]
                x, p = torch.cat(xs), torch.cat(ps)
                if carry_x is not None:
                    x, p = torch.cat([carry_x, x]), torch.cat([carry_p, p])
                if shuffle:
                    perm = torch.randperm(x.shape[0], generator=g)
                    x, p = x[perm], p[perm]
                n_full = (x.shape[0] // batch_size) * batch_size
                for i in range(0, n_full, batch_size):
                    yield self._emit(x[i:i + batch_size], p[i:i + batch_size], dtype, device, return_positions)
                carry_x, carry_p = x[n_full:], p[n_full:]
            if carry_x is not None and carry_x.shape[0] and not drop_last:
                yield self._emit(carry_x, carry_p, dtype, device, return_positions)

    @staticmethod
    def _emit(x, p, dtype, device, return_positions):
        x = x.to(dtype)
        if device is not None:
            x = x.to(device, non_blocking=True)
        return (x, p) if return_positions else x

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationStore({str(self.path)!r}, model={m['model']!r}, hooks={self.hooks}, rows={len(self):,}, "
                f"d_model={self.d_model}, dtype={self.dtype}, complete={m.get('complete')})")


def capture_throughput(model, packed: PackedTokens, hook: str, batch_size: int = 16, n_batches_: int = 4,
                       stop: bool = True) -> float:
    """Tokens/s of the capture forward (stop=True) or of a full forward (stop=False); for benchmarks."""
    point = resolve_hook(model, hook)
    ids = torch.from_numpy(packed.tokens[:batch_size].astype(np.int64)).to(next(underlying(model).parameters()).device)
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
