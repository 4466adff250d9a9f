"""Training straight from the running model (`ModelSource`): documents drawn from across a corpus
split in a seeded random order, packed as capture packs them, run through the model (one forward
for every hook, stopped after the deepest), and their activations mixed in a window of many
sequences before they are served as batches. Nothing but the SAEs' checkpoints is written.

The stream is made of lanes: lane r reads every lanes-th document of the order, so under
torch.distributed each rank streams its own documents, and one process given lanes=2 serves the
same global batches as two ranks. A lane fills a window with `window_batches` batches' worth of
tokens (by default WINDOW_TOKENS), shuffles it (seeded by the seed, the lane and the window's
number) and serves it; a window's last partial batch is dropped. Where each lane stands
(`position`) is a few numbers per lane: the documents read and the packer's carry at its window's
start, and the batches served from it. A resumed run rebuilds that window with one pass of the
model and goes on from there.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import threading
import time
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..activations.capture import kept_activations
from ..data import CorpusError
from ..data.corpus import BUNDLED, SHUFFLE_BUFFER, corpus_split, iter_documents
from ..data.packing import Packer
from ..models import d_model, model_name, resolve_hook, underlying
from .config import TrainingError
from .sources import SAMPLE_OFFSETS

# tokens a lane's mixing window holds unless window_batches is given: twice the smallest window
# that matched a shuffled store (results/stream_mixing/README.md)
WINDOW_TOKENS = 131_072


class ModelSource:
    """Activations at `hooks` computed by `model` on `corpus`'s `split` as training asks for them.
    With one hook a batch is a [B, d] tensor; with several, a dict of them by hook name."""

    endless = True  # the trainer asks for total_tokens; the source never runs out

    def __init__(
        self,
        model,
        hooks: str | Sequence[str],
        corpus: str | None = None,
        split: str = "train",
        seq_len: int = 128,
        forward_batch: int = 16,
        window_batches: int | None = None,
        lanes: int | None = None,
        text_field: str = "text",
    ):
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not hooks:
            raise TrainingError("no hook points given; pass e.g. --hook resid_post.15")
        twice = sorted({h for h in hooks if hooks.count(h) > 1})
        if twice:
            raise TrainingError(f"hook {', '.join(twice)} is given twice; give each hook once")
        if (window_batches is not None and window_batches < 1) or forward_batch < 1 or seq_len < 2:
            raise TrainingError(
                "window_batches and forward_batch must be at least 1 and seq_len at least 2"
            )
        self.model, self.hooks = model, hooks
        self.points = [resolve_hook(model, h) for h in hooks]
        self.ds, self.split_rule = corpus_split(corpus, split, text_field)
        self.corpus, self.split, self.text_field = corpus or BUNDLED, split, text_field
        self.seq_len, self.forward_batch = seq_len, forward_batch
        self.window_batches, self.lanes = window_batches, lanes
        self.d_model = d_model(model)
        self.device = next(underlying(model).parameters()).device
        self.origin = None  # nothing on disk is read that an output could overwrite
        # seed -> lane -> the last windows' (first batch, state at the window's start): position()
        self._positions: dict = {}
        self._lock = threading.Lock()
        self.forward_s = 0.0  # seconds spent in the model's forward passes, for benchmarks
        self._kept: dict = {}  # (seed, lane, batch, window) -> a first window kept (keep_first)
        self._first: dict = {}  # (seed, lane, batch, order) -> θ's batches (keep_calibration)
        _return_large_blocks()

    def __len__(self) -> int:
        return 2**62  # endless: any number of tokens can be asked for

    def sample(self, purpose: str, seed: int) -> dict:
        """The batches() arguments of a run's samples, from the run's own first documents as a
        store's are from its own rows: "init" (the start's sample) as training serves them, that
        window kept for training (keep_first); "calibrate" (θ's final batches) in another order,
        since θ from the batches a run trained on first comes out higher
        (results/stream_mixing/README.md), kept while training reads that window
        (keep_calibration). Either way the model runs on them once."""
        return (
            {"seed": seed}
            if purpose == "init"
            else {"seed": seed, "order": seed + SAMPLE_OFFSETS["calibrate"]}
        )

    def window(self, batch: int) -> int:
        """Batches of `batch` rows in a lane's window: window_batches, else as many as hold
        WINDOW_TOKENS tokens."""
        return self.window_batches or max(1, -(-WINDOW_TOKENS // batch))

    def width(self, hook: str | None = None) -> int:
        """The width of the activations at a hook."""
        return self.d_model

    def identity(self) -> dict:
        """What the stream is (checkpoints.run_identity): each field a resume must share."""
        fields = {
            "model": model_name(self.model),
            "hooks": self.hooks,
            "corpus": self.corpus,
            "split": self.split,
            "text_field": self.text_field,
            "seq_len": self.seq_len,
            "window_batches": self.window_batches,
        }
        raw = json.dumps(fields, sort_keys=True).encode()
        where = f"{fields['model']} at {', '.join(self.hooks)} on {self.corpus} ({self.split})"
        return {
            "kind": "model",
            "where": where,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "fields": fields,
        }

    # -- the batches --------------------------------------------------------------------------
    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        skip_batches: int = 0,
        rank: int = 0,
        world_size: int = 1,
        position: dict | None = None,
        keep_first: bool = False,
        keep_calibration: int = 0,
        order: int | None = None,
        total_batches: int | None = None,
        **_,
    ) -> Iterator:
        """Batches of batch_size rows (this rank's part of the global batch): one lane's under
        torch.distributed, every lane's side by side in one process. position: where a checkpoint
        left the stream (its batches from skip_batches on); None starts at the beginning.
        keep_first: keep each lane's first window, so that the next call with this seed (training,
        after the start's sample was drawn from it) serves it without running the model again.
        keep_calibration: keep (on the CPU) that many batches of the first window in the order of
        sample("calibrate"), so that the call for θ's final batches serves them without running the
        model again. order: the seed of the windows' shuffle (None: the seed's own). total_batches:
        the batches the run asks for in all, past which no window is filled (None: no end)."""
        lanes = self.lanes or world_size
        if world_size not in (1, lanes):
            raise TrainingError(
                f"a stream of {lanes} lanes is read by 1 process or {lanes} ranks, not {world_size}"
            )
        mine = list(range(lanes)) if world_size == 1 else [rank]
        if batch_size % len(mine):
            raise TrainingError(f"batch_size {batch_size} must divide by the {len(mine)} lanes")
        starts = (position or {}).get("lanes", {})
        with self._lock:
            self._positions[seed] = {lane: [] for lane in mine}
        lane_batch = batch_size // len(mine)
        streams = [
            self._lane(
                lane,
                lanes,
                lane_batch,
                seed,
                skip_batches,
                starts.get(str(lane)),
                keep_first,
                keep_calibration,
                order,
                total_batches,
            )
            for lane in mine
        ]
        for parts in zip(*streams):
            # several lanes side by side; one lane's batch as it is (no copy)
            batch = (
                parts[0]
                if len(parts) == 1
                else {h: torch.cat([p[h] for p in parts]) for h in self.hooks}
            )
            yield batch if len(self.hooks) > 1 else batch[self.hooks[0]]

    def position(self, step: int, seed: int = 0) -> dict:
        """Where the stream of `seed` stands once `step` batches are served: per lane the start of
        the window the next batch comes from and how many of its batches were served. A checkpoint
        records it; `batches(position=..., skip_batches=step)` resumes from it."""
        with self._lock:
            found = {}
            for lane, windows in self._positions.get(seed, {}).items():
                first, start = max((w for w in windows if w[0] <= step), key=lambda w: w[0])
                found[str(lane)] = {**start, "served": step - first}
        return {"lanes": found}

    def _lane(self, lane, lanes, batch, seed, skip, start, keep_first, keep_calib, order, total):
        """One lane's batches from batch `skip` on (start: the window it is in, else the first)."""
        order = seed if order is None else order
        with self._lock:
            again = self._first.pop((seed, lane, batch, order), []) if start is None else []
        yield from again  # θ's batches, kept while training read their window: no forward
        fresh = {"pass": 0, "read": 0, "carry": None, "window": 0, "served": len(again)}
        state = dict(start) if start else fresh
        served = state.pop("served", 0)
        first = skip + len(again) - served  # the batch number of this window's first batch
        packer = Packer(self.model.tokenizer, self.seq_len)
        docs = self._documents(lane, lanes, seed, state)
        if state["carry"] is not None:
            packer.restore(state["carry"])
        while True:
            window_start = {**state, "carry": packer.carry()}
            key = (seed, lane, batch, state["window"])
            kept = self._kept.pop(key, None)
            if kept is None:
                size = self.window(batch)
                if total is not None and first < total:  # no window past the run's last batch
                    size = min(size, total - first)
                acts = self._fill(packer, docs, state, batch, size)
            else:  # the window a start's sample was drawn from: the same documents, run once
                acts, after, carry = kept
                state.update(after)
                packer.restore(carry)
                docs = self._documents(lane, lanes, seed, state)
            if keep_first and state["window"] == 0:
                self._kept[key] = (acts, {k: state[k] for k in ("read", "pass")}, packer.carry())
            n = next(iter(acts.values())).shape[0] // batch
            with self._lock:
                recent = self._positions[seed][lane]
                self._positions[seed][lane] = [*recent[-3:], (first, window_start)]
            if keep_calib and start is None and state["window"] == 0:
                self._keep_calibration(acts, seed, lane, batch, keep_calib)
            rows = _shuffled(n * batch, order, lane, state["window"], self.device)
            for j in range(served, n):
                yield {h: a[rows[j * batch : (j + 1) * batch]] for h, a in acts.items()}
            first += n
            served = 0
            state["window"] += 1

    def _keep_calibration(self, acts: dict, seed: int, lane: int, batch: int, n: int) -> None:
        """The first n batches a calibration call would serve from this first window, on the CPU."""
        order = self.sample("calibrate", seed)["order"]
        whole = next(iter(acts.values())).shape[0] // batch
        rows, n = _shuffled(whole * batch, order, lane, 0, self.device), min(n, whole)
        kept = [
            {h: a[rows[j * batch : (j + 1) * batch]].cpu() for h, a in acts.items()}
            for j in range(n)
        ]
        with self._lock:
            self._first[(seed, lane, batch, order)] = kept

    def _fill(self, packer: Packer, docs, state: dict, batch: int, size: int) -> dict:
        """One window: documents packed until it holds `size` batches of tokens, run through the
        model; their kept activations by hook. `state` advances past the documents."""
        want = size * batch
        packer.flush(final=False, max_tokens=want)  # the tokens carried from the last window first
        while packer.kept < want:
            d, text, state["read"], state["pass"] = next(docs)
            packer.add([(d, text)])
            packer.flush(final=False, max_tokens=want)
        packed = packer.take()
        t0 = time.perf_counter()
        parts: list[list[torch.Tensor]] = [[] for _ in self.points]
        for s in range(0, packed.n_sequences, self.forward_batch):
            e = min(s + self.forward_batch, packed.n_sequences)
            with torch.no_grad():  # no graph of the model's forward beside the SAEs' steps
                kept, _ = kept_activations(self.model, packed, s, e, self.points, self.device)
            for j, a in enumerate(kept):
                parts[j].append(a.float())
        acts = {h: torch.cat(p) for h, p in zip(self.hooks, parts)}
        self.forward_s += time.perf_counter() - t0
        return acts

    def _documents(self, lane: int, lanes: int, seed: int, state: dict):
        """(document index, text, documents of the pass read once this one is, pass) of this lane,
        from where `state` says, pass after pass over the split in a fresh seeded order each."""
        p, read = state["pass"], state["read"]
        while True:
            got = False
            for d, text, n in self._one_pass(lane, lanes, seed, p, read):
                got = True
                yield d, text, n, p
            if not got and read == 0:
                raise CorpusError(
                    f"the {self.split} split of {self.corpus} gives lane {lane} of {lanes} no "
                    "document; use a larger corpus"
                )
            p, read = p + 1, 0
            warnings.warn(
                f"the {self.split} split of {self.corpus} is used up (lane {lane}); training goes "
                f"on with pass {p + 1} over it, in a new order",
                stacklevel=2,
            )

    def _one_pass(self, lane: int, lanes: int, seed: int, p: int, read: int):
        """This lane's documents of pass p after the first `read`: (index, text, read so far). The
        first pass is in capture's order (sample_documents): a store of the same seed holds the
        same tokens."""
        rng = np.random.default_rng(seed if p == 0 else [seed, p])
        if hasattr(self.ds, "__len__") and hasattr(self.ds, "select"):
            order = rng.permutation(len(self.ds))[lane::lanes]
            for n, i in enumerate(order[read:], start=read + 1):
                text = self.ds[int(i)][self.text_field]
                if text and text.strip():
                    yield int(i), text, n
            return
        # a streamed data set: its own seeded shuffle buffer, this lane's share, skipped to `read`
        shuffle_seed = seed if p == 0 else int(rng.integers(2**31))
        ds = self.ds.shuffle(seed=shuffle_seed, buffer_size=SHUFFLE_BUFFER)
        rows = itertools.islice(
            iter_documents(ds, self.text_field), lane + read * lanes, None, lanes
        )
        for n, (i, text) in enumerate(rows, start=read + 1):
            yield i, text, n


def _return_large_blocks() -> None:
    """Have glibc hand every block of 1 MiB or more back to the system when freed: with its
    moving threshold, windows and forward passes freed in turn fragment the heap and the peak
    memory creeps up with the tokens (benchmarks/results/stream_memory_cpu.txt)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator is its own


def _shuffled(n: int, order: int, lane: int, window: int, device) -> torch.Tensor:
    """The order a window's n rows are served in: seeded by the order, the lane and the window."""
    seed = (order * 1_000_003 + lane * 7_919 + window) % 2**63
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
