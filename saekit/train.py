"""Train one or several SAEs on one stream of activations (each batch read once).

Adam, warmup then linear decay, gradient clipping, unit-norm decoder rows with the parallel gradient
removed, b_dec at the data's geometric median, AuxK on dead latents, atomic checkpoints that resume to
the same weights as an uninterrupted run (on CPU), a pandas log per SAE.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .activations import ActivationStore, atomic_write_bytes, atomic_write_json
from .distributed import LossModule, all_reduce_fired, barrier, broadcast_module, world_size
from .distributed import rank as dist_rank
from .sae import SAE, SAEConfig, make_sae


class TrainingError(RuntimeError):
    """Training stopped: non-finite values, or inputs that do not fit the SAEs."""


@dataclass
class TrainConfig:
    """How to train (shared by every SAE trained on the stream)."""
    total_tokens: int = 2_000_000
    batch_size: int = 4096
    # None: default_lr(d_sae) for each SAE (see there); a number: that rate for every SAE
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay_frac: float = 0.2  # linear decay to zero over the final fraction of steps
    grad_clip: float = 1.0
    b_dec_init: str = "geometric_median"  # or "mean" or "zeros"
    init_tokens: int = 16_384  # tokens used for b_dec init and the dataset-wide scale
    seed: int = 0
    device: str | None = None  # None: cuda if available, else cpu
    autocast: bool | None = None  # bf16 autocast; None: on where the device supports it well (cuda)
    fast: bool = True  # sparse encoder/decoder path for the TopK family
    calibrate_batches: int = 20  # BatchTopK: re-estimate theta with the final weights over this many batches
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    buffer_rows: int = 262_144
    # batches read ahead in a background thread (pinned + async copy on CUDA); 0: off; None: 2 on CUDA, off on
    # CPU, where the thread competes with the step for the cores (2 cores: data-loading share 27% without, 46% with)
    prefetch: int | None = None
    progress: bool = True
    wandb_project: str | None = None  # logs to wandb only if installed and this is set

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def lr_for(self, d_sae: int) -> float:
        """The learning rate of an SAE with d_sae latents: `lr` if set, else default_lr(d_sae)."""
        return float(self.lr) if self.lr is not None else default_lr(d_sae)


LR_BASE = 8e-4  # default_lr at 2^14 latents: 4x sparsify's 2e-4, measured best of a sweep (benchmarks/lr_default.py)


def default_lr(d_sae: int) -> float:
    """LR_BASE / sqrt(d_sae / 2^14): larger for small dictionaries, which the paper's fixed 3e-4 (meant
    for 12k+ latents and a billion tokens) under-trains in short runs (benchmarks/results/lr_default_cpu.txt)."""
    return LR_BASE / math.sqrt(d_sae / 2 ** 14)


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    """Linear warmup to 1, flat, then linear decay to 0 over the last `decay_frac` of the steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_frac)
    decay_start = total_steps - decay_steps
    if decay_steps and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * max(1.0, float(y.norm())):
            return y_new
        y = y_new
    return y


# ---------------------------------------------------------------------------------------------
# data sources


class TensorSource:
    """An in-memory [N, d] tensor served as shuffled batches (the same interface as ActivationStore)."""

    def __init__(self, x: torch.Tensor):
        if x.ndim != 2:
            raise TrainingError(f"activations must be a 2-D [N, d] tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TrainingError(f"activations must be floating point, got {x.dtype}")
        if x.shape[0] == 0:
            raise TrainingError("the activation tensor is empty")
        self.x = x
        self.d_model = int(x.shape[1])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int, seed: int = 0, epochs: int = 1, skip_batches: int = 0, rank: int = 0,
                world_size: int = 1, **_) -> Iterator:
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
                    yield self.x[perm[i + rank * batch_size:i + (rank + 1) * batch_size]].float()
                done += 1


class StoreSource:
    """An ActivationStore as a training source (one hook)."""

    def __init__(self, store: ActivationStore, hook: str | None = None):
        self.store = store
        self.hook = hook or store.hook
        self.d_model = store.d_model

    def __len__(self) -> int:
        return len(self.store)

    def batches(self, batch_size: int, seed: int = 0, epochs: int = 1, skip_batches: int = 0,
                buffer_rows: int = 262_144, rank: int = 0, world_size: int = 1, **_) -> Iterator:
        """Shuffled batches; with world_size > 1 each rank reads its own chunks of the store."""
        it = self.store.batches(batch_size, hook=self.hook, seed=seed, epochs=epochs, drop_last=True,
                                buffer_rows=buffer_rows, rank=rank, world_size=world_size)
        for i, x in enumerate(it):
            if i >= skip_batches:
                yield x


def as_source(data, hook: str | None = None):
    """Accept an ActivationStore or its folder, a [N, d] tensor, a .npy or .safetensors file."""
    if isinstance(data, (TensorSource, StoreSource)):
        return data
    if isinstance(data, ActivationStore):
        return StoreSource(data, hook)
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if isinstance(data, np.ndarray):
        return TensorSource(torch.from_numpy(data))
    path = Path(data)
    if path.is_dir():
        return StoreSource(ActivationStore(path, hook), hook)
    if not path.exists():
        raise TrainingError(f"no activations at {path}: give an activation store folder, a .npy or .safetensors file")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise TrainingError(f"{path} is not a readable .npy file ({e})") from e
        return TensorSource(torch.from_numpy(np.array(arr, dtype=np.float32)))
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise TrainingError(f"{path} is not a readable .safetensors file ({e})") from e
        if len(tensors) != 1 and "activations" not in tensors:
            raise TrainingError(f"{path} holds tensors {sorted(tensors)}; name the one to use 'activations'")
        return TensorSource(tensors.get("activations", next(iter(tensors.values()))))
    raise TrainingError(f"{path}: unsupported activation file type '{path.suffix}' (use a store folder, .npy or .safetensors)")


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
    """Batches read ahead in a background thread (store reads, dtype conversion and shuffling overlap the
    training step); on CUDA they are pinned and copied without blocking. `wait_s` is the time the training
    loop spent waiting for data: the data-loading share of the run is wait_s / run time."""

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
                if self.device.type == "cuda":
                    x = x.pin_memory().to(self.device, non_blocking=True)
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


# ---------------------------------------------------------------------------------------------
# optimiser state <-> safetensors (no pickle in checkpoints)


def _optim_to_tensors(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k, v in st.items():
            out[f"{i}.{k}"] = v.detach().cpu().contiguous().clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def _optim_from_tensors(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], t: dict) -> None:
    for i, p in enumerate(params):
        # moments take the parameter's memory layout (W_enc is stored transposed): fused Adam walks param,
        # grad and moments as flat memory, so a contiguous copy of a transposed moment would be misread
        st = {k.split(".", 1)[1]: (torch.empty_like(p).copy_(v) if v.shape == p.shape else v.to(p.device))
              for k, v in t.items() if k.split(".", 1)[0] == str(i)}
        if st:
            if "step" in st:  # fused Adam keeps its step count on the parameter's device
                st["step"] = st["step"].to(p.device if opt.defaults.get("fused") else "cpu")
            opt.state[p] = st


# ---------------------------------------------------------------------------------------------
# trainer


@dataclass
class TrainResult:
    saes: list[SAE]
    logs: list[pd.DataFrame]
    out: Path | None
    steps: int
    tokens: int
    seconds: float
    names: list[str] = field(default_factory=list)
    data_wait_s: float = 0.0  # time the loop waited for batches (see Prefetcher)

    @property
    def data_share(self) -> float:
        """Fraction of the training loop's time spent waiting for data."""
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


class Trainer:
    """Several SAEs, one stream. Each SAE has its own Adam and schedule; the batches are shared."""

    def __init__(self, cfgs: Sequence[SAEConfig], train_cfg: TrainConfig, out: str | Path | None = None):
        if not cfgs:
            raise TrainingError("no SAE configurations given")
        self.cfgs = list(cfgs)
        self.tc = train_cfg
        self.out = Path(out) if out is not None else None
        self.device = torch.device(train_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if world_size() > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's GPU
        use_ac = train_cfg.autocast
        if use_ac is None:
            use_ac = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = bool(use_ac)
        names = [c.name for c in self.cfgs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        torch.manual_seed(train_cfg.seed)
        self.saes = [make_sae(c).to(self.device) for c in self.cfgs]
        self.lrs = [train_cfg.lr_for(c.d_sae) for c in self.cfgs]
        self.opts = [torch.optim.Adam(s.optim_groups(), lr=lr, betas=train_cfg.betas, fused=True)
                     for s, lr in zip(self.saes, self.lrs)]  # fused: one kernel per parameter group (CPU and CUDA)
        # torch.distributed: one replica per rank, DDP all-reduces gradients, BatchTopK selects globally
        self.rank, self.world = dist_rank(), world_size()
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            if train_cfg.batch_size % self.world:
                raise TrainingError(f"batch_size {train_cfg.batch_size} is the global batch and must divide by the "
                                    f"{self.world} ranks; use a multiple of {self.world}")
            for sae in self.saes:
                sae.distributed = True
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = [DistributedDataParallel(LossModule(s, train_cfg.fast), device_ids=ids,
                                                forward_sync_buffers=False)
                        for s in self.saes]
        self.logs: list[list[dict]] = [[] for _ in self.saes]
        self.step = 0
        self.tokens = 0
        self.initialised = False

    # -- initialisation from data -------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, sample: torch.Tensor) -> None:
        sample = sample.to(self.device).float()
        for sae in self.saes:
            if sae.cfg.normalize == "dataset":
                sae.input_scale.fill_(math.sqrt(sae.cfg.d_in / sample.pow(2).sum(-1).mean().clamp_min(1e-12).item()))
            xs, _ = sae.normalize_input(sample)
            if self.tc.b_dec_init == "geometric_median":
                sae.b_dec.data = geometric_median(xs)
            elif self.tc.b_dec_init == "mean":
                sae.b_dec.data = xs.mean(0)
            sae.init_from_data(xs)
            if self.world > 1:  # every rank drew its own sample: rank 0's initialisation for all
                broadcast_module(sae)
        self.initialised = True

    # -- checkpoints --------------------------------------------------------------------------
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def local_batch(self) -> int:
        """This rank's part of the global batch (batch_size is the global batch)."""
        return self.tc.batch_size // self.world

    @property
    def _shard(self) -> dict:
        return {"rank": self.rank, "world_size": self.world} if self.world > 1 else {}

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint atomically (rank 0 only under torch.distributed)."""
        if self.rank != 0:
            return None
        root = self._ckpt_root()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step:08d}"
        tmp = root / f".tmp_step_{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()},
                      str(tmp / f"sae_{i}.safetensors"))
            save_file(_optim_to_tensors(opt, list(sae.parameters())), str(tmp / f"optim_{i}.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": self.step, "tokens": self.tokens, "train_cfg": self.tc.to_dict(),
            "sae_cfgs": [c.to_dict() for c in self.cfgs], "names": self.names, "logs": self.logs,
        }))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic publish of the whole checkpoint
        olds = sorted(p for p in root.glob("step_*") if p != final)
        for p in olds[: max(0, len(olds) - (self.tc.keep_checkpoints - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        if self.out is None or not self._ckpt_root().exists():
            return None
        good = [p for p in sorted(self._ckpt_root().glob("step_*")) if (p / "state.json").exists()]
        return good[-1] if good else None

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        saved_cfgs = [SAEConfig.from_dict(c).to_dict() for c in state["sae_cfgs"]]
        if saved_cfgs != [c.to_dict() for c in self.cfgs]:
            raise TrainingError(f"checkpoint {path} was made for different SAE configurations; use a new output "
                                f"folder or the same settings to resume")
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            sae.load_state_dict({k: v.to(self.device) for k, v in load_file(str(path / f"sae_{i}.safetensors")).items()})
            _optim_from_tensors(opt, list(sae.parameters()), load_file(str(path / f"optim_{i}.safetensors")))
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.logs = state["logs"]
        self.initialised = True

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> list[dict]:
        """One optimiser step of every SAE on batch x [B, d_in]. Returns per-SAE stats."""
        tc = self.tc
        if not torch.isfinite(x).all():
            raise TrainingError(self._nan_message("the input activations", "replace or re-capture them"))
        factor = lr_factor(self.step, tc.total_steps, tc.warmup_steps, tc.decay_frac)
        stats = []
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            for g in opt.param_groups:
                g["lr"] = self.lrs[i] * factor * g["lr_scale"]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.ddp[i](x) if self.ddp else sae.training_loss(x, fast=tc.fast)
            if not torch.isfinite(out.loss):
                raise TrainingError(self._nan_message(f"the loss of SAE {self.names[i]}", "lower the learning rate"))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_grad()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), tc.grad_clip)
            opt.step()
            sae.normalize_decoder()
            if self.world > 1:  # dead-latent counters see the global batch
                sae.update_dead(all_reduce_fired(out.fired), x.shape[0] * self.world)
            else:
                sae.update_dead(out.fired, x.shape[0])
            extra = sae.after_step_stats(out)
            stats.append((out, extra, self.lrs[i] * factor))
        self.step += 1
        self.tokens += x.shape[0] * self.world
        return self._log(stats)

    def _nan_message(self, what: str, fix: str) -> str:
        ck = self.latest_checkpoint()
        kept = f"the last good checkpoint is kept at {ck}" if ck else "no checkpoint had been written yet"
        return f"NaN/inf in {what} at step {self.step} (batch {self.step}, tokens {self.tokens:,}); {kept}. Fix: {fix}."

    @torch.no_grad()
    def _log(self, stats) -> list[dict]:
        rows = []
        log_now = self.step % max(1, self.tc.log_every) == 0 or self.step == self.tc.total_steps
        for i, (out, extra, lr) in enumerate(stats):
            sae = self.saes[i]
            row = {"step": self.step, "tokens": self.tokens, "loss": float(out.loss), "lr": lr}
            row.update({k: float(v) for k, v in out.terms.items()})
            err = (out.x_hat.float() - out.x.float()).pow(2).sum()
            row["nmse"] = float(err / out.x.float().pow(2).sum().clamp_min(1e-12))
            row["l0"] = float(out.l0.float().mean())
            row["dead_frac"] = float(sae.dead_mask().float().mean())
            row["theta"] = extra.get("theta", float("nan"))
            if log_now:
                self.logs[i].append(row)
            rows.append(row)
        return rows

    def log_frames(self) -> list[pd.DataFrame]:
        return [pd.DataFrame(rows) for rows in self.logs]

    def write_outputs(self) -> None:
        if self.out is None or self.rank != 0:
            return
        for name, sae, frame in zip(self.names, self.saes, self.log_frames()):
            folder = self.out / name
            sae.save(folder)
            atomic_write_bytes(folder / "train_log.csv", lambda fh, f=frame: fh.write(f.to_csv(index=False).encode()))
        atomic_write_json(self.out / "train_config.json", {"train": self.tc.to_dict(), "names": self.names,
                                                           "lrs": self.lrs,
                                                           "saes": [c.to_dict() for c in self.cfgs],
                                                           "steps": self.step, "tokens": self.tokens})

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, data, hook: str | None = None, resume: bool = True,
            callback: Callable[["Trainer", list[dict]], None] | None = None, stop_after: int | None = None) -> TrainResult:
        """Train on `data` for total_tokens. resume=True continues from the latest checkpoint in `out`.

        callback(trainer, stats) runs after every step (live plots); stop_after stops early (tests).
        """
        source = as_source(data, hook)
        for c in self.cfgs:
            if c.d_in != source.d_model:
                raise TrainingError(f"SAE {c.name} has d_in={c.d_in} but the activations have d={source.d_model}; "
                                    f"set d_in={source.d_model}")
        tc = self.tc
        n = len(source)
        if n < tc.batch_size:
            raise TrainingError(f"the activations hold {n} rows, fewer than one batch of {tc.batch_size}; "
                                f"capture more tokens or lower batch_size")
        barrier()  # (distributed) every rank sees the same checkpoints
        ckpt = self.latest_checkpoint() if resume else None
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        if not self.initialised:
            init = []
            got = 0
            for x in source.batches(self.local_batch, seed=tc.seed + 7919, buffer_rows=tc.buffer_rows, **self._shard):
                init.append(x)
                got += x.shape[0]
                if got >= tc.init_tokens:
                    break
            sample = torch.cat(init)
            if not torch.isfinite(sample).all():
                raise TrainingError("NaN/inf in the input activations (seen while initialising); re-capture them")
            self.initialise(sample)
        per_epoch = n // tc.batch_size
        # ranks of a store read whole chunks, so their shares differ a little: one spare epoch keeps every
        # rank stepping until total_steps (a rank that ran out would leave the others waiting)
        epochs = math.ceil(tc.total_steps / per_epoch) + (self.world > 1)
        t0 = time.perf_counter()
        loader = None
        bar = tqdm(total=tc.total_steps, initial=self.step, desc="train", unit="step", disable=not tc.progress or self.rank != 0)
        run = self._maybe_wandb() if self.rank == 0 else None
        try:
            limit = tc.total_steps if stop_after is None else min(tc.total_steps, stop_after)
            batches = source.batches(self.local_batch, seed=tc.seed, epochs=epochs, skip_batches=self.step,
                                     **self._shard,
                                     buffer_rows=tc.buffer_rows) if self.step < limit else ()
            if self.step < limit:
                batches = itertools.islice(batches, limit - self.step)  # read ahead no further than needed
                ahead = tc.prefetch if tc.prefetch is not None else (2 if self.device.type == "cuda" else 0)
                batches = loader = Prefetcher(batches, self.device, ahead) if ahead else TimedBatches(batches)
            for x in batches:
                stats = self.train_step(x.to(self.device, non_blocking=True))
                if callback is not None:
                    callback(self, stats)
                if run is not None:
                    run.log({f"{nm}/{k}": v for nm, s in zip(self.names, stats) for k, v in s.items()}, step=self.step)
                s0 = stats[0]
                bar.set_postfix(loss=f"{s0['loss']:.4g}", nmse=f"{s0['nmse']:.3f}", l0=f"{s0['l0']:.1f}",
                                dead=f"{s0['dead_frac']:.2f}")
                bar.update(1)
                if self.out is not None and tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
                    barrier()
                if self.step >= limit:
                    break
        finally:
            bar.close()
            if loader is not None:
                loader.close()
            if run is not None:
                run.finish()
        if self.step >= tc.total_steps and tc.calibrate_batches:
            self.calibrate(source)
        for sae in self.saes:
            sae.eval()
        if self.out is not None:
            if self.step >= tc.total_steps or tc.checkpoint_every:
                self.save_checkpoint()
            self.write_outputs()
            barrier()
        return TrainResult(self.saes, self.log_frames(), self.out, self.step, self.tokens,
                           time.perf_counter() - t0, self.names, data_wait_s=loader.wait_s if loader else 0.0)

    def calibrate(self, source) -> None:
        """Final BatchTopK thresholds from the final weights (same seed: the same batches on resume)."""
        if not any(hasattr(s, "calibrate_threshold") for s in self.saes):
            return
        batches = []
        for x in source.batches(self.local_batch, seed=self.tc.seed + 104729, buffer_rows=self.tc.buffer_rows,
                                **self._shard):
            batches.append(x.to(self.device))
            if len(batches) >= self.tc.calibrate_batches:
                break
        for sae in self.saes:
            if hasattr(sae, "calibrate_threshold"):
                sae.calibrate_threshold(batches)
                if self.world > 1:  # the mean of the ranks' estimates
                    torch.distributed.all_reduce(sae.threshold)
                    sae.threshold /= self.world

    def _maybe_wandb(self):
        if not self.tc.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            return None
        return wandb.init(project=self.tc.wandb_project, config={"train": self.tc.to_dict(),
                                                                  "saes": [c.to_dict() for c in self.cfgs]})


def train(data, cfgs: SAEConfig | Sequence[SAEConfig], train_cfg: TrainConfig | None = None,
          out: str | Path | None = None, hook: str | None = None, resume: bool = True, **kwargs) -> TrainResult:
    """Train SAE(s) on activations (store, folder, tensor, .npy or .safetensors). See Trainer.fit."""
    cfgs = [cfgs] if isinstance(cfgs, SAEConfig) else list(cfgs)
    trainer = Trainer(cfgs, train_cfg or TrainConfig(), out)
    return trainer.fit(data, hook=hook, resume=resume, **kwargs)
