"""Where training batches come from: an activation store, an in-memory tensor or a file, read in the
loop or ahead of it in a background thread."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..activations import ActivationStore, open_store
from .config import TrainingError

# the offsets of the seeds of a run's samples from its training seed: other orders of its data
SAMPLE_OFFSETS = {"init": 7919, "calibrate": 104_729}


class HeldRows:
    """What sources of rows held whole (in memory or in a store) share."""

    def sample(self, purpose: str, seed: int) -> dict:
        """The batches() arguments of the start's sample ("init") or θ's final batches
        ("calibrate"): the same rows in another order than training's."""
        return {"seed": seed + SAMPLE_OFFSETS[purpose]}


class TensorSource(HeldRows):
    """An in-memory [N, d] tensor served as shuffled batches (the same interface as
    ActivationStore)."""

    def __init__(self, x: torch.Tensor, origin: Path | None = None):
        if x.ndim != 2:
            raise TrainingError(
                f"activations must be a 2-D [N, d] tensor, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TrainingError(f"activations must be floating point, got {x.dtype}")
        if x.shape[0] == 0:
            raise TrainingError("the activation tensor is empty")
        self.x = x
        self.d_model = int(x.shape[1])
        self.origin = origin  # the file it was read from, which no output may overwrite

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def identity(self) -> dict:
        """What the data is (checkpoints.run_identity): its shape and a hash of its values."""
        values = self.x.detach().cpu().contiguous()
        raw = values.view(torch.uint8)
        return {
            "kind": "tensor",
            "where": f"{list(values.shape)} {values.dtype}",
            "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
        }

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        epochs: int = 1,
        skip_batches: int = 0,
        rank: int = 0,
        world_size: int = 1,
        **_,
    ) -> Iterator:
        """Shuffled batches; with world_size > 1, rank r gets part r of each global batch of
        batch_size * world_size rows (so the ranks together see what one process would)."""
        n = len(self)
        done = 0
        glob = batch_size * world_size
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - glob + 1, glob):
                if done >= skip_batches:
                    yield self.x[perm[i + rank * batch_size : i + (rank + 1) * batch_size]].float()
                done += 1


class StoreSource(HeldRows):
    """An ActivationStore as a training source (one hook)."""

    def __init__(self, store: ActivationStore, hook: str | None = None):
        self.store = store
        self.hook = hook or store.hook
        self.d_model = store.d_model
        self.origin = store.path

    def __len__(self) -> int:
        return len(self.store)

    def identity(self) -> dict:
        """What the data is (checkpoints.run_identity): the store's manifest and the hook read."""
        manifest = json.dumps(self.store.manifest, sort_keys=True).encode()
        return {
            "kind": "store",
            "where": f"{self.store.path} at {self.hook}",
            "sha256": hashlib.sha256(manifest + self.hook.encode()).hexdigest(),
        }

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        epochs: int = 1,
        skip_batches: int = 0,
        buffer_rows: int = 131_072,
        rank: int = 0,
        world_size: int = 1,
        **_,
    ) -> Iterator:
        """Shuffled batches; with world_size > 1 each rank reads its own chunks of the store."""
        it = self.store.batches(
            batch_size,
            hook=self.hook,
            seed=seed,
            epochs=epochs,
            drop_last=True,
            buffer_rows=buffer_rows,
            rank=rank,
            world_size=world_size,
        )
        for i, x in enumerate(it):
            if i >= skip_batches:
                yield x


def rows_of(batch) -> int:
    """The rows of a batch: a [B, d] tensor, or a dict of them by hook."""
    return next(iter(batch.values())).shape[0] if isinstance(batch, dict) else batch.shape[0]


def to_device(batch, device: torch.device, non_blocking: bool = False):
    """A batch (a tensor, or a dict of them by hook) on `device`."""
    if isinstance(batch, dict):
        return {h: v.to(device, non_blocking=non_blocking) for h, v in batch.items()}
    return batch.to(device, non_blocking=non_blocking)


def rows_device(batch) -> torch.device:
    return (next(iter(batch.values())) if isinstance(batch, dict) else batch).device


def _pinned(batch):
    if isinstance(batch, dict):
        return {h: v.pin_memory() for h, v in batch.items()}
    return batch.pin_memory()


def origin_of(data) -> Path | None:
    """Where training data lies on disk (a store folder, an activation file), read from what `train`
    is given before it is opened; None for data in memory."""
    if isinstance(data, (str, Path)):
        return Path(data)
    return getattr(data, "origin", getattr(data, "path", None))


def as_source(data, hook: str | None = None):
    """Accept an ActivationStore or its folder, a [N, d] tensor, a .npy or .safetensors file."""
    if isinstance(data, (TensorSource, StoreSource)) or getattr(data, "endless", False):
        return data
    if isinstance(data, ActivationStore):
        return StoreSource(data, hook)
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if isinstance(data, np.ndarray):
        return TensorSource(torch.from_numpy(data))
    path = Path(data)
    if path.is_dir():
        return StoreSource(open_store(path, hook), hook)
    if not path.exists():
        raise TrainingError(
            f"no activations at {path}: give an activation store "
            "folder, a .npy or .safetensors file"
        )
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise TrainingError(f"{path} is not a readable .npy file ({e})") from e
        return TensorSource(torch.from_numpy(np.array(arr, dtype=np.float32)), path)
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise TrainingError(f"{path} is not a readable .safetensors file ({e})") from e
        if len(tensors) != 1 and "activations" not in tensors:
            raise TrainingError(
                f"{path} holds tensors {sorted(tensors)}; name the one to use 'activations'"
            )
        return TensorSource(tensors.get("activations", next(iter(tensors.values()))), path)
    raise TrainingError(
        f"{path}: unsupported activation file type '{path.suffix}' (use a store folder, .npy or "
        ".safetensors)"
    )


class TimedBatches:
    """Batches read in the training loop itself (no read-ahead), timing the reads as `wait_s`."""

    def __init__(self, batches: Iterable):
        self.it = iter(batches)
        self.wait_s = 0.0

    def __iter__(self):
        while True:
            t = time.perf_counter()
            try:
                x = next(self.it)
            except StopIteration:
                return
            finally:
                self.wait_s += time.perf_counter() - t
            yield x

    def close(self) -> None:
        pass


class Prefetcher:
    """Batches read ahead in a background thread (store reads, dtype conversion and shuffling
    overlap the training step); on CUDA they are pinned and copied without blocking. `wait_s` is the
    time the training loop spent waiting for data: the data-loading share of the run is wait_s /
    run time."""

    _END = object()

    def __init__(self, batches: Iterable, device: torch.device, depth: int = 2):
        self.device = device
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.wait_s = 0.0
        self.thread = threading.Thread(target=self._produce, args=(iter(batches),), daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, it) -> None:
        try:
            for x in it:
                if self.device.type == "cuda" and rows_device(x).type == "cpu":
                    x = to_device(_pinned(x), self.device, non_blocking=True)
                if not self._put(x):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training loop
            self._put(e)

    def __iter__(self):
        try:
            while True:
                t = time.perf_counter()
                item = self.queue.get()
                self.wait_s += time.perf_counter() - t
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
