"""The run around the training step: checkpoints, the loop over the data with its progress bar, the
final θ re-estimate and the outputs. `TrainingRun` is mixed into `Trainer`, which holds the step
itself."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed as D
from ..plumbing.files import atomic_write_csv, atomic_write_json, os_error_message
from ..sae import SAEConfig
from . import checkpoints
from .config import TrainingError
from .results import TrainResult
from .sources import Prefetcher, TimedBatches, as_source, origin_of, rows_of, to_device


class TrainingRun:
    """Mixed into Trainer: uses its SAEs, optimisers, configs, output folder, train_step and
    restore_hints."""

    # -- checkpoints (saekit.train.checkpoints) ---------------------------------------------
    @property
    def local_batch(self) -> int:
        """This rank's part of the global batch (batch_size is the global batch)."""
        return self.tc.batch_size // self.world

    @property
    def _shard(self) -> dict:
        return {"rank": self.rank, "world_size": self.world} if self.world > 1 else {}

    def save_checkpoint(self, stream: dict | None = None) -> Path | None:
        """Write a checkpoint atomically (rank 0 only under torch.distributed; every rank calls it,
        for the stream's position, unless `stream` gives it)."""
        stream = stream or self._stream_now()
        if self.rank != 0:
            return None
        progress = {
            "step": self.step,
            "tokens": self.tokens,
            "train_cfg": self.tc.to_dict(),
            "run": self.run,
            "sae_cfgs": [c.to_dict() for c in self.cfgs],
            "names": self.names,
            "logs": self.logs,
            "hints": [h.as_record() for h in self.hints],
            "segments": self._segments_now(),
            "stream": stream,
        }
        return checkpoints.write(
            self.out / "checkpoints",
            self.step,
            self.saes,
            self.opts,
            self.device,
            progress,
            keep=self.tc.keep_checkpoints,
        )

    def _stream_now(self) -> dict | None:
        """Where a stream from the model stands after this step, every rank's lane (None: the
        data is a store, a file or a tensor, whose batches the step number finds)."""
        position = getattr(self.source, "position", None)
        if position is None:
            return None
        lanes = position(self.step, self.tc.seed)["lanes"]
        if self.world > 1:
            lanes = {k: v for every in D.gather_objects(lanes) for k, v in every.items()}
        return {"lanes": lanes}

    def _segments_now(self) -> list[dict]:
        """The run's segments, the current one ending at this step."""
        if self.segments:
            self.segments[-1]["to_step"] = self.step
        return self.segments

    def latest_checkpoint(self) -> Path | None:
        return checkpoints.latest(self.out / "checkpoints") if self.out is not None else None

    def load_checkpoint(self, path: Path) -> None:
        progress = checkpoints.progress(path)
        saved_cfgs = [SAEConfig.from_dict(c).to_dict() for c in progress["sae_cfgs"]]
        checkpoints.check_resume(
            path, {**progress.get("run", {}), "sae_cfgs": saved_cfgs}, self.run
        )
        checkpoints.restore(path, self.saes, self.opts, self.device)
        self.step, self.tokens = int(progress["step"]), int(progress["tokens"])
        self.logs = progress["logs"]
        self.segments = list(progress.get("segments") or [])
        self.stream_position = progress.get("stream")  # where a stream from the model resumes
        # paths chosen as by an uninterrupted run
        self.restore_hints(progress.get("hints") or [None] * len(self.saes))
        self.n_dead = [None] * len(self.saes)
        self.initialised = True

    def log_frames(self) -> list[pd.DataFrame]:
        return [pd.DataFrame(rows) for rows in self.logs]

    def write_outputs(self) -> None:
        if self.out is None or self.rank != 0:
            return
        for name, sae, frame in zip(self.names, self.saes, self.log_frames()):
            folder = self.out / name
            sae.save(folder)
            atomic_write_csv(folder / "train_log.csv", frame)
        atomic_write_json(
            self.out / "train_config.json",
            {
                "train": self.tc.to_dict(),
                "names": self.names,
                "lrs": self.lrs,
                "autocast": self.autocasts,
                "saes": [c.to_dict() for c in self.cfgs],
                "steps": self.step,
                "tokens": self.tokens,
                "segments": self._segments_now(),
            },
        )

    # -- the loop -----------------------------------------------------------------------------
    def fit(
        self,
        data,
        hook: str | None = None,
        resume: bool = True,
        callback: Callable[[TrainingRun, list[dict]], None] | None = None,
        stop_after: int | None = None,
    ) -> TrainResult:
        """Train on `data` for total_tokens. resume=True continues from the latest checkpoint in
        `out`, if that checkpoint was made by this run (checkpoints.check_resume). `out` is checked
        and locked first.

        callback(trainer, stats) runs after every step (live plots); stop_after stops early (tests).
        """
        source = as_source(data, hook)
        with contextlib.ExitStack() as held:
            if self.out is not None and not self.claimed:
                D.on_rank0(
                    lambda: checkpoints.claim_output(
                        held, self.out, self.cfgs, self.tc.keep_checkpoints, origin_of(source)
                    )
                )
            return self._fit(source, resume, callback, stop_after)

    def _fit(self, source, resume: bool, callback, stop_after: int | None) -> TrainResult:
        self.source = source
        self._check_source(source)
        self._start_or_resume(source, resume)
        tc = self.tc
        limit = tc.total_steps if stop_after is None else min(tc.total_steps, stop_after)
        t0 = time.perf_counter()
        stream, loader = self._batches(source, limit)
        try:
            self._loop(loader if loader is not None else (), limit, callback)
        finally:
            if loader is not None:
                loader.close()
            # (a read-ahead thread that did not stop still runs it)
            with contextlib.suppress(ValueError):
                # now: the store keeps its buffer for calibration
                getattr(stream, "close", lambda: None)()
        self._finish(source)
        return TrainResult(
            self.saes,
            self.log_frames(),
            self.out,
            self.step,
            self.tokens,
            time.perf_counter() - t0,
            self.names,
            data_wait_s=loader.wait_s if loader else 0.0,
        )

    def _check_source(self, source) -> None:
        """The data fits the SAEs and holds at least one batch."""
        for c in self.cfgs:
            width = source.width(c.hook_name) if hasattr(source, "width") else source.d_model
            if c.d_in != width:
                raise TrainingError(
                    f"SAE {c.name} has d_in={c.d_in} but the activations have d={width}; "
                    f"set d_in={width}"
                )
        n = len(source)
        if n < self.tc.batch_size:
            raise TrainingError(
                f"the activations hold {n} rows, fewer than one batch of {self.tc.batch_size}; "
                "capture more tokens or lower batch_size"
            )

    def _start_or_resume(self, source, resume: bool) -> None:
        """Resume from this run's latest checkpoint (checked to be this run's), or start: each
        SAE initialised from a sample of the data. A new segment is recorded either way."""
        tc = self.tc
        D.barrier()  # (distributed) every rank sees the same checkpoints
        self.run = checkpoints.run_identity(source, tc, self.cfgs, self.lrs, self.autocasts)
        ckpt = self.latest_checkpoint() if resume else None
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        if self.step < tc.total_steps or not self.segments:  # a finished run reopened adds none
            self.segments.append(checkpoints.segment(tc, self.device, self.step))
        if self.initialised:
            return
        init, got = [], 0
        sample = source.sample("init", tc.seed)
        for x in source.batches(
            self.local_batch,
            **sample,
            buffer_rows=tc.buffer_rows,
            keep_first=True,
            total_batches=tc.total_steps,
            **self._shard,
        ):
            init.append(x)
            got += rows_of(x)
            if got >= tc.init_tokens:
                break
        sample = _joined(init)
        if not all(torch.isfinite(v).all() for v in _parts(sample)):
            raise TrainingError(
                "NaN/inf in the input activations (seen while initialising); re-capture them"
            )
        self.initialise(sample)

    def _batches(self, source, limit: int):
        """(the store's stream, the batches the loop reads): from this step on, up to `limit`, read
        ahead where that pays. (None, None) where the run has no step left."""
        tc = self.tc
        if self.step >= limit:
            return None, None
        # ranks of a store read whole chunks, so their shares differ a little: one spare epoch keeps
        # every rank stepping until total_steps (a rank that ran out would leave the others waiting)
        epochs = math.ceil(tc.total_steps / (len(source) // tc.batch_size)) + (self.world > 1)
        stream = source.batches(
            self.local_batch,
            seed=tc.seed,
            epochs=epochs,
            skip_batches=self.step,
            **self._shard,
            buffer_rows=tc.buffer_rows,
            position=self.stream_position,
            keep_calibration=tc.calibrate_batches if any(s.has_theta for s in self.saes) else 0,
            total_batches=tc.total_steps,
        )
        batches = itertools.islice(stream, limit - self.step)  # read ahead no further than needed
        ahead = tc.prefetch if tc.prefetch is not None else (2 if self.device.type == "cuda" else 0)
        return stream, Prefetcher(batches, self.device, ahead) if ahead else TimedBatches(batches)

    def _loop(self, batches, limit: int, callback) -> None:
        """Train on `batches` up to step `limit`: progress, logging and checkpoints."""
        tc = self.tc
        bar = tqdm(
            total=tc.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not tc.progress or self.rank != 0,
        )
        shown = -math.inf
        run = self._maybe_wandb() if self.rank == 0 else None
        try:
            for x in batches:
                stats = self.train_step(to_device(x, self.device, non_blocking=True))
                if callback is not None:
                    callback(self, stats)
                if run is not None:
                    run.log(
                        {f"{nm}/{k}": v for nm, s in zip(self.names, stats) for k, v in s.items()},
                        step=self.step,
                    )
                if not bar.disable and time.monotonic() - shown >= 0.5:  # read when shown
                    s0, shown = stats[0], time.monotonic()
                    bar.set_postfix(
                        loss=f"{s0['loss']:.4g}",
                        nmse=f"{s0['nmse']:.3f}",
                        l0=f"{s0['l0']:.1f}",
                        dead=f"{s0['dead_frac']:.2f}",
                    )
                bar.update(1)
                if self.out is not None and tc.checkpoint_every:
                    if self.step % tc.checkpoint_every == 0:
                        self.save_checkpoint()
                        D.barrier()
                if self.step >= limit:
                    break
        finally:
            bar.close()
            if run is not None:
                run.finish()

    def _finish(self, source) -> None:
        """θ from the final weights where the run is done, a last checkpoint and the outputs."""
        tc = self.tc
        stream = self._stream_now()  # before θ's batches, which a stream serves from its start
        if self.step >= tc.total_steps and tc.calibrate_batches:
            self.calibrate(source)
        for sae in self.saes:
            sae.eval()
        if self.out is None:
            return
        if self.step >= tc.total_steps or tc.checkpoint_every:
            self.save_checkpoint(stream)
        try:
            self.write_outputs()
        # the checkpoint above holds the work: a re-run writes the outputs from it
        except OSError as e:
            raise TrainingError(
                f"{os_error_message(e)}. The trained SAEs are kept in "
                f"{self.latest_checkpoint()}: run the same command again to write them"
            ) from e
        D.barrier()

    def calibrate(self, source) -> None:
        """Final BatchTopK thresholds from the final weights (same seed: the same batches on
        resume)."""
        if not any(s.has_theta for s in self.saes):
            return
        batches = []
        for x in source.batches(
            self.local_batch,
            **source.sample("calibrate", self.tc.seed),
            total_batches=self.tc.total_steps,
            buffer_rows=self.tc.buffer_rows,
            **self._shard,
        ):
            batches.append(to_device(x, self.device))
            if len(batches) >= self.tc.calibrate_batches:
                break
        for i, sae in enumerate(self.saes):
            if sae.has_theta:
                mine = [self.input_of(i, b) for b in batches]
                sae.calibrate_threshold(mine, over_ranks=self.world > 1)

    def _maybe_wandb(self):
        if not self.tc.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            return None
        return wandb.init(
            project=self.tc.wandb_project,
            config={"train": self.tc.to_dict(), "saes": [c.to_dict() for c in self.cfgs]},
        )


def _joined(batches: list):
    """Batches (tensors, or dicts of them by hook) joined into one."""
    if isinstance(batches[0], dict):
        return {h: torch.cat([b[h] for b in batches]) for h in batches[0]}
    return torch.cat(batches)


def _parts(batch) -> list:
    return list(batch.values()) if isinstance(batch, dict) else [batch]
