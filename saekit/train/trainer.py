"""Train one or several SAEs on one stream of activations (each batch read once).

Adam, warmup then linear decay, gradient clipping, unit-norm decoder rows with the parallel gradient
removed, b_dec at the data's geometric median, AuxK on dead latents, atomic checkpoints that resume to
the same weights as an uninterrupted run (on CPU), a pandas log per SAE.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed as D
from ..files import atomic_write_csv, atomic_write_json, os_error_message
from ..metrics.reconstruction import nmse_tensor
from ..models import default_device
from ..sae import SAEConfig, Step, make_sae
from . import checkpoints, graphs, init, optim
from .config import TrainConfig, TrainingError, lr_factor
from .results import StepStats, TrainResult
from .sources import Prefetcher, TimedBatches, as_source


# what a step tells the next one (its share of active entries, its cut): checkpoints keep them, so that a
HINTS = ("previous_density", "previous_cut")  # resumed run takes an uninterrupted run's paths


class Trainer:
    """Several SAEs, one stream. Each SAE has its own Adam and schedule; the batches are shared."""

    def __init__(self, cfgs: Sequence[SAEConfig], train_cfg: TrainConfig, out: str | Path | None = None):
        if not cfgs:
            raise TrainingError("no SAE configurations given")
        self.cfgs = list(cfgs)
        self.tc = train_cfg
        self.out = Path(out) if out is not None else None
        self.device = torch.device(train_cfg.device or default_device())
        if D.world_size() > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's GPU
        names = [c.name for c in self.cfgs]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        torch.manual_seed(train_cfg.seed)
        self.saes = [make_sae(c).to(self.device) for c in self.cfgs]
        self.lrs = [train_cfg.lr_for(c.d_sae) for c in self.cfgs]
        self.opts = [torch.optim.Adam(s.optim_groups(), lr=lr, betas=train_cfg.betas, fused=True)
                     for s, lr in zip(self.saes, self.lrs)]  # fused: one kernel per parameter group (CPU and CUDA)
        self.params = [[p for g in o.param_groups for p in g["params"]] for o in self.opts]  # what each one steps
        # torch.distributed: one replica per rank, DDP all-reduces gradients, BatchTopK selects globally
        self.rank, self.world = D.rank(), D.world_size()
        # bf16 autocast per SAE: on a CPU it pays only for a large enough step (config.autocast_default)
        self.autocasts = [train_cfg.uses_autocast(self.device, c, self.local_batch) for c in self.cfgs]
        self.ddp = None
        if self.world > 1:
            if train_cfg.batch_size % self.world:
                raise TrainingError(f"batch_size {train_cfg.batch_size} is the global batch and must divide by the "
                                    f"{self.world} ranks; use a multiple of {self.world}")
            self.ddp = D.wrap_ddp(self.saes, train_cfg.fast, self.device)
        self.logs: list[list[dict]] = [[] for _ in self.saes]
        self.hints: list[dict] = [dict.fromkeys(HINTS) for _ in self.saes]  # each SAE's, for its next Step
        self.n_dead: list[int | None] = [None] * len(self.saes)  # dead latents after the last step, where counted
        self.graphed: list[graphs.GraphedStep | None] = [None] * len(self.saes)  # step_graphs (see there)
        self.step = 0
        self.tokens = 0
        self.initialised = False
        self.run: dict = {}  # what its checkpoints may be resumed with (checkpoints.run_identity), set by fit

    # -- initialisation from data -------------------------------------------------------------
    def initialise(self, sample: torch.Tensor) -> None:
        """Each SAE's start from a sample of the data (saekit.train.init); rank 0's for every rank."""
        sample = sample.to(self.device).float()
        for sae in self.saes:
            init.from_sample(sae, sample, self.tc.b_dec_init)
            if self.world > 1:  # every rank drew its own sample
                D.broadcast_module(sae)
        self.initialised = True

    # -- checkpoints (saekit.train.checkpoints) ---------------------------------------------
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
        progress = {"step": self.step, "tokens": self.tokens, "train_cfg": self.tc.to_dict(), "run": self.run,
                    "sae_cfgs": [c.to_dict() for c in self.cfgs], "names": self.names, "logs": self.logs,
                    "hints": [{k: _number(v) for k, v in h.items()} for h in self.hints]}
        return checkpoints.write(self.out / "checkpoints", self.step, self.saes, self.opts, self.device, progress,
                                 keep=self.tc.keep_checkpoints)

    def latest_checkpoint(self) -> Path | None:
        return checkpoints.latest(self.out / "checkpoints") if self.out is not None else None

    def load_checkpoint(self, path: Path) -> None:
        progress = checkpoints.progress(path)
        saved_cfgs = [SAEConfig.from_dict(c).to_dict() for c in progress["sae_cfgs"]]
        checkpoints.check_resume(path, {**progress.get("run", {}), "sae_cfgs": saved_cfgs}, self.run)
        checkpoints.restore(path, self.saes, self.opts, self.device)
        self.step, self.tokens = int(progress["step"]), int(progress["tokens"])
        self.logs = progress["logs"]
        for mine, saved in zip(self.hints, progress.get("hints") or [{}] * len(self.saes)):
            mine.update({k: v for k, v in saved.items() if k in HINTS})  # paths chosen as by an uninterrupted run
        self.n_dead = [None] * len(self.saes)
        self.initialised = True

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> list[StepStats]:
        """One optimiser step of every SAE on batch x [B, d_in]. Returns per-SAE stats (read when asked for)."""
        tc = self.tc
        factor = lr_factor(self.step, tc.total_steps, tc.warmup_steps, tc.decay_frac)
        n_tokens = x.shape[0] * self.world
        stats = []
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            for g in opt.param_groups:
                if isinstance(g["lr"], torch.Tensor):  # a recorded step (graphs) reads its rate from this tensor
                    g["lr"].fill_(self.lrs[i] * factor * g["lr_scale"])
                else:
                    g["lr"] = self.lrs[i] * factor * g["lr_scale"]
            due = self.step % max(1, sae.cfg.aux_every) == 0  # from the step count, so a resumed run agrees
            if self.graphed[i] is None:
                self.graphed[i] = graphs.start(sae, opt, n_tokens, x.shape[0], tc, self.autocasts[i], self.world,
                                               self.hints[i], self.n_dead[i])
            if self.graphed[i] is not None:  # the step recorded once and replayed (graphs.GraphedStep)
                finite, values = self.graphed[i].step(x, due)
                if not finite:
                    self._not_finite(i, x)
                stats.append((values, self.lrs[i] * factor))
                continue
            step = Step(aux=due, cut_hint=self.hints[i]["previous_cut"], density_hint=self.hints[i]["previous_density"],
                        sync_free=tc.sync_free, n_dead=self.n_dead[i], distributed=self.world > 1)
            out, since, n_dead = self._forward_backward(i, x, n_tokens, step)
            sae.remove_parallel_grad()
            if tc.grad_clip:  # by the step itself (fused Adam's grad_scale), not by scaling the gradients first
                optim.clip_in_step(opt, self.params[i], tc.grad_clip)
            opt.step()
            sae.normalize_decoder()
            sae.tokens_since_fired.copy_(since)
            self.n_dead[i] = n_dead
            self._remember(i, out)
            extra = sae.after_step(out)
            stats.append((self._values(out, extra, n_dead / sae.cfg.d_sae), self.lrs[i] * factor))
        self.step += 1
        self.tokens += n_tokens
        return self._log(stats)

    def _forward_backward(self, i: int, x: torch.Tensor, n_tokens: int, step: Step):
        """SAE i's loss and gradients on x, checked with the step's one read-back (after backward, before any weight
        changes): the loss is finite, a selection made without read-backs was exact (else the step is redone with
        Step(exact=True)), the dead latents' number after this step, and the next step's hints. Returns (out, the
        new dead-latent counters, that number)."""
        sae = self.saes[i]
        each = self.device.type == "cpu" and self.tc.sync_free is None  # a read-back costs nothing there
        for redo in (False, True):
            if redo:  # the selection without read-backs was not exact: once more, exactly
                step = dataclasses.replace(step, exact=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocasts[i]):
                out = self.ddp[i](x, step) if self.ddp else sae.training_loss(x, step, fast=self.tc.fast)
            optim.drop_grads(self.params[i])
            out.loss.backward()
            fired = D.all_reduce_fired(out.fired) if self.world > 1 else out.fired  # the global batch's
            since, n_dead = sae.next_dead_counters(fired, n_tokens)
            hints = [v for v in (out.cut, out.count) if v is not None]
            finite, exact, n_dead, *got = _read_back(out.loss, out.exact, n_dead, hints, each)
            if exact:
                break
        else:
            raise TrainingError(f"SAE {self.names[i]}'s training selection was not exact even when redone with "
                                f"Step(exact=True); its select must select exactly then")
        got = iter(got)
        out = out._replace(cut_value=next(got) if out.cut is not None else None,
                           count_value=next(got) if out.count is not None else None)
        if not finite:
            self._not_finite(i, x)
        return out, since, int(n_dead)

    def _remember(self, i: int, out) -> None:
        """What this step tells SAE i's next one: its cut (the selection's hint), its share of active entries."""
        hints = self.hints[i]
        if out.cut_value is not None:
            hints["previous_cut"] = out.cut_value
        if out.count_value is not None:
            hints["previous_density"] = out.count_value / (out.x.shape[0] * self.saes[i].cfg.d_sae)
        else:
            hints["previous_density"] = out.density

    def _not_finite(self, i: int, x: torch.Tensor):
        if not bool(torch.isfinite(x).all()):  # NaN in x makes every loss NaN: which of the two it was
            raise TrainingError(self._nan_message("the input activations", "replace or re-capture them"))
        raise TrainingError(self._nan_message(f"the loss of SAE {self.names[i]}", "lower the learning rate"))

    def _nan_message(self, what: str, fix: str) -> str:
        ck = self.latest_checkpoint()
        kept = f"the last good checkpoint is kept at {ck}" if ck else "no checkpoint had been written yet"
        return f"NaN/inf in {what} at step {self.step} (batch {self.step}, tokens {self.tokens:,}); {kept}. Fix: {fix}."

    @staticmethod
    def _values(out, extra: dict, dead_frac: float) -> dict:
        """An eager step's figures as StepStats reads them (tensors, or functions that make one, read when asked)."""
        return {"loss": out.loss, **out.terms,
                "nmse": lambda x=out.x.detach(), x_hat=out.x_hat.detach(): nmse_tensor(x.float(), x_hat.float()),
                "l0": lambda l0=out.l0: l0.float().mean(), "dead_frac": dead_frac,
                "theta": extra.get("theta", float("nan"))}

    @torch.no_grad()
    def _log(self, stats) -> list[StepStats]:
        rows = []
        log_now = self.step % max(1, self.tc.log_every) == 0 or self.step == self.tc.total_steps
        for i, (values, lr) in enumerate(stats):
            row = StepStats({"step": self.step, "tokens": self.tokens, "loss": values["loss"], "lr": lr,
                             **{k: v for k, v in values.items() if k != "loss"}})
            if log_now:
                self.logs[i].append(dict(row))
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
            atomic_write_csv(folder / "train_log.csv", frame)
        atomic_write_json(self.out / "train_config.json", {"train": self.tc.to_dict(), "names": self.names,
                                                           "lrs": self.lrs, "autocast": self.autocasts,
                                                           "saes": [c.to_dict() for c in self.cfgs],
                                                           "steps": self.step, "tokens": self.tokens})

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, data, hook: str | None = None, resume: bool = True,
            callback: Callable[["Trainer", list[dict]], None] | None = None, stop_after: int | None = None) -> TrainResult:
        """Train on `data` for total_tokens. resume=True continues from the latest checkpoint in `out`, if that
        checkpoint was made by this run (checkpoints.check_resume). `out` is checked and locked first.

        callback(trainer, stats) runs after every step (live plots); stop_after stops early (tests).
        """
        source = as_source(data, hook)
        with contextlib.ExitStack() as held:
            if self.out is not None:
                D.on_rank0(lambda: checkpoints.claim_output(held, self.out, self.cfgs, self.tc.keep_checkpoints))
            return self._fit(source, resume, callback, stop_after)

    def _fit(self, source, resume: bool, callback, stop_after: int | None) -> TrainResult:
        for c in self.cfgs:
            if c.d_in != source.d_model:
                raise TrainingError(f"SAE {c.name} has d_in={c.d_in} but the activations have d={source.d_model}; "
                                    f"set d_in={source.d_model}")
        tc = self.tc
        n = len(source)
        if n < tc.batch_size:
            raise TrainingError(f"the activations hold {n} rows, fewer than one batch of {tc.batch_size}; "
                                f"capture more tokens or lower batch_size")
        D.barrier()  # (distributed) every rank sees the same checkpoints
        self.run = checkpoints.run_identity(source, tc, self.cfgs)
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
        loader, stream = None, ()
        bar = tqdm(total=tc.total_steps, initial=self.step, desc="train", unit="step", disable=not tc.progress or self.rank != 0)
        shown = -math.inf
        run = self._maybe_wandb() if self.rank == 0 else None
        try:
            limit = tc.total_steps if stop_after is None else min(tc.total_steps, stop_after)
            batches = stream = source.batches(self.local_batch, seed=tc.seed, epochs=epochs, skip_batches=self.step,
                                              **self._shard, buffer_rows=tc.buffer_rows) if self.step < limit else ()
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
                if not bar.disable and time.monotonic() - shown >= 0.5:  # read the step's figures when shown
                    s0, shown = stats[0], time.monotonic()
                    bar.set_postfix(loss=f"{s0['loss']:.4g}", nmse=f"{s0['nmse']:.3f}", l0=f"{s0['l0']:.1f}",
                                    dead=f"{s0['dead_frac']:.2f}")
                bar.update(1)
                if self.out is not None and tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save_checkpoint()
                    D.barrier()
                if self.step >= limit:
                    break
        finally:
            bar.close()
            if loader is not None:
                loader.close()
            with contextlib.suppress(ValueError):  # (a read-ahead thread that did not stop still runs it)
                getattr(stream, "close", lambda: None)()  # now: the store keeps its buffer for calibration
            if run is not None:
                run.finish()
        if self.step >= tc.total_steps and tc.calibrate_batches:
            self.calibrate(source)
        for sae in self.saes:
            sae.eval()
        if self.out is not None:
            if self.step >= tc.total_steps or tc.checkpoint_every:
                self.save_checkpoint()
            try:
                self.write_outputs()
            except OSError as e:  # the checkpoint above holds the work: a re-run writes the outputs from it
                raise TrainingError(f"{os_error_message(e)}. The trained SAEs are kept in {self.latest_checkpoint()}: "
                                    f"run the same command again to write them") from e
            D.barrier()
        return TrainResult(self.saes, self.log_frames(), self.out, self.step, self.tokens,
                           time.perf_counter() - t0, self.names, data_wait_s=loader.wait_s if loader else 0.0)

    def calibrate(self, source) -> None:
        """Final BatchTopK thresholds from the final weights (same seed: the same batches on resume)."""
        if not any(s.has_theta for s in self.saes):
            return
        batches = []
        for x in source.batches(self.local_batch, seed=self.tc.seed + 104729, buffer_rows=self.tc.buffer_rows,
                                **self._shard):
            batches.append(x.to(self.device))
            if len(batches) >= self.tc.calibrate_batches:
                break
        for sae in self.saes:
            if sae.has_theta:
                sae.calibrate_threshold(batches, over_ranks=self.world > 1)

    def _maybe_wandb(self):
        if not self.tc.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            return None
        return wandb.init(project=self.tc.wandb_project, config={"train": self.tc.to_dict(),
                                                                  "saes": [c.to_dict() for c in self.cfgs]})


def _read_back(loss: torch.Tensor, exact: torch.Tensor | None, n_dead: torch.Tensor, hints: list, each: bool) -> list:
    """[loss is finite, the selection was exact, n_dead, *hints] as numbers: one transfer (optim.stack_scalars: one
    operator), or with `each` (on the CPU, where a read-back costs nothing) one .item() each, which is cheaper there."""
    if each:
        return [math.isfinite(loss.item()), exact is None or bool(exact), int(n_dead), *(float(v) for v in hints)]
    got = optim.stack_scalars([loss, n_dead, *hints, *([] if exact is None else [exact])]).tolist()
    return [math.isfinite(got[0]), exact is None or bool(got[-1]), got[1], *got[2:2 + len(hints)]]


def _number(v):
    """A hint as checkpoints keep it: a number (a recorded step holds it as a 0-dim tensor)."""
    return float(v) if isinstance(v, torch.Tensor) else v


def train(data, cfgs: SAEConfig | Sequence[SAEConfig], train_cfg: TrainConfig | None = None,
          out: str | Path | None = None, hook: str | None = None, resume: bool = True, **kwargs) -> TrainResult:
    """Train SAE(s) on activations (store, folder, tensor, .npy or .safetensors). See Trainer.fit."""
    cfgs = [cfgs] if isinstance(cfgs, SAEConfig) else list(cfgs)
    tc = train_cfg or TrainConfig()
    with contextlib.ExitStack() as held:
        if out is not None:  # before the SAEs take memory: a run whose outputs cannot be written never starts
            D.on_rank0(lambda: checkpoints.claim_output(held, Path(out), cfgs, tc.keep_checkpoints))
        return Trainer(cfgs, tc, out).fit(data, hook=hook, resume=resume, **kwargs)
