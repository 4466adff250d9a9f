"""Train one or several SAEs on one stream of activations (each batch read once).

Adam, warmup then linear decay, gradient clipping, unit-norm decoder rows with the parallel gradient
removed, b_dec at the data's geometric median, AuxK on dead latents, atomic checkpoints that resume
to the same weights as an uninterrupted run (on CPU), a pandas log per SAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import distributed as D
from ..metrics.reconstruction import nmse_tensor
from ..models import check_device, default_device
from ..sae import SAEConfig, Step, fast, make_sae
from . import checkpoints, graphs, init, optim
from .config import TrainConfig, TrainingError, lr_factor
from .results import StepStats, TrainResult
from .run import TrainingRun
from .sources import origin_of, rows_of


class Trainer(TrainingRun):
    """Several SAEs, one stream. Each SAE has its own Adam and schedule; the batches are shared."""

    def __init__(
        self, cfgs: Sequence[SAEConfig], train_cfg: TrainConfig, out: str | Path | None = None
    ):
        if not cfgs:
            raise TrainingError("no SAE configurations given")
        self.cfgs = list(cfgs)
        self.tc = train_cfg
        self.out = Path(out) if out is not None else None
        self.device = torch.device(check_device(train_cfg.device) or default_device())
        if D.world_size() > 1 and self.device.type == "cuda" and self.device.index is None:
            # torchrun: this rank's GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.names = unique_names(self.cfgs)
        torch.manual_seed(train_cfg.seed)
        self.saes = [make_sae(c).to(self.device) for c in self.cfgs]
        self.lrs = [train_cfg.lr_for(c.d_sae) for c in self.cfgs]
        self.opts = [
            torch.optim.Adam(s.optim_groups(), lr=lr, betas=train_cfg.betas, fused=True)
            # fused: one kernel per parameter group (CPU and CUDA)
            for s, lr in zip(self.saes, self.lrs)
        ]
        # what each one steps
        self.params = [[p for g in o.param_groups for p in g["params"]] for o in self.opts]
        # torch.distributed: one replica per rank, DDP all-reduces gradients,
        # BatchTopK selects globally
        self.rank, self.world = D.rank(), D.world_size()
        # bf16 autocast per SAE: on a CPU it pays only for a large enough step
        # (config.autocast_default)
        self.autocasts = [
            train_cfg.uses_autocast(self.device, c, self.local_batch) for c in self.cfgs
        ]
        self.ddp = None
        if self.world > 1:
            if train_cfg.batch_size % self.world:
                raise TrainingError(
                    f"batch_size {train_cfg.batch_size} is the global batch and must divide by the "
                    f"{self.world} ranks; use a multiple of {self.world}"
                )
            loss = functools.partial(fast.training_loss, enabled=train_cfg.fast)
            self.ddp = D.wrap_ddp(self.saes, self.device, loss)
        self.logs: list[list[dict]] = [[] for _ in self.saes]
        # each SAE's, for its next step's Plan
        self.hints: list[fast.Hints] = [fast.Hints() for _ in self.saes]
        # dead latents after the last step, where counted
        self.n_dead: list[int | None] = [None] * len(self.saes)
        # step_graphs (see there)
        self.graphed = graphs.StepGraphs(train_cfg, len(self.saes))
        self.step = 0
        self.tokens = 0
        self.initialised = False
        # what its checkpoints may be resumed with (checkpoints.run_identity), set by fit
        self.run: dict = {}
        # the stretches the run was computed in, one per start or resume (checkpoints.segment)
        self.segments: list[dict] = []
        # where a stream from the model resumes (ModelSource.position), from a checkpoint
        self.stream_position: dict | None = None
        self.claimed = False  # `out` already checked and locked (by `train`, before the SAEs)
        self.source = None  # the training data's source, set by fit

    # -- initialisation from data -------------------------------------------------------------
    def initialise(self, sample) -> None:
        """Each SAE's start from a sample of the data (saekit.train.init; by hook where the data has
        several); rank 0's for every rank."""
        for i, sae in enumerate(self.saes):
            mine = self.input_of(i, sample).to(self.device).float()
            init.from_sample(sae, mine, self.tc.b_dec_init)
            if self.world > 1:  # every rank drew its own sample
                D.broadcast_module(sae)
        self.initialised = True

    # -- one step -----------------------------------------------------------------------------
    def input_of(self, i: int, batch):
        """SAE i's inputs in a batch: the batch itself, or where it holds several hooks (a dict by
        hook), its SAE's hook."""
        return batch[self.cfgs[i].hook_name] if isinstance(batch, dict) else batch

    def train_step(self, batch) -> list[StepStats]:
        """One optimiser step of every SAE on a batch [B, d_in] (or a dict of them by hook). Returns
        per-SAE stats (read when asked for)."""
        tc = self.tc
        factor = lr_factor(self.step, tc.total_steps, tc.warmup_steps, tc.decay_frac)
        n_tokens = rows_of(batch) * self.world
        stats = []
        for i, (sae, opt) in enumerate(zip(self.saes, self.opts)):
            x = self.input_of(i, batch)
            for g in opt.param_groups:
                # a recorded step (graphs) reads its rate from this tensor
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(self.lrs[i] * factor * g["lr_scale"])
                else:
                    g["lr"] = self.lrs[i] * factor * g["lr_scale"]
            # from the step count, so a resumed run agrees
            due = self.step % max(1, sae.cfg.aux_every) == 0
            recorded = self.graphed.ready(
                i,
                sae,
                opt,
                n_tokens,
                x.shape[0],
                self.autocasts[i],
                self.world,
                self.hints[i],
                self.n_dead[i],
            )
            # the step recorded once and replayed (graphs.GraphedStep)
            if recorded is not None:
                finite, values = recorded.step(x, due)
                if not finite:
                    self._not_finite(i, x)
                stats.append((values, self.lrs[i] * factor))
                continue
            step = Step(aux=due, distributed=self.world > 1)
            plan = self.hints[i].plan(sync_free=tc.sync_free, n_dead=self.n_dead[i])
            out, since, n_dead = self._forward_backward(i, x, n_tokens, step, plan)
            sae.remove_parallel_grad()
            # by the step itself (fused Adam's grad_scale), not by scaling the gradients first
            if tc.grad_clip:
                optim.clip_in_step(opt, self.params[i], tc.grad_clip)
            opt.step()
            sae.normalize_decoder()
            sae.tokens_since_fired.copy_(since)
            self.n_dead[i] = n_dead
            extra = sae.after_step(out)
            stats.append((self._values(out, extra, n_dead / sae.cfg.d_sae), self.lrs[i] * factor))
        self.step += 1
        self.tokens += n_tokens
        return self._log(stats)

    def _forward_backward(self, i: int, x: torch.Tensor, n_tokens: int, step: Step, plan):
        """SAE i's loss and gradients on x (the speed layer's one call), checked with the step's one
        read-back (after backward, before any weight changes): the loss is finite, a selection made
        without read-backs was exact (else the step is redone with Plan(exact=True)), the dead
        latents' number after this step, and the next step's hints. Returns (out, the new
        dead-latent counters, that number)."""
        sae = self.saes[i]
        # a read-back costs nothing there
        each = self.device.type == "cpu" and self.tc.sync_free is None
        for redo in (False, True):
            if redo:  # the selection without read-backs was not exact: once more, exactly
                plan = dataclasses.replace(plan, exact=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocasts[i]):
                out = (
                    self.ddp[i](x, step, plan)
                    if self.ddp
                    else fast.training_loss(sae, x, step, plan, enabled=self.tc.fast)
                )
            optim.drop_grads(self.params[i])
            out.loss.backward()
            # the global batch's
            fired = D.all_reduce_fired(out.fired) if self.world > 1 else out.fired
            since, n_dead = sae.next_dead_counters(fired, n_tokens)
            hints = [v for v in (out.cut, out.count) if v is not None]
            finite, exact, n_dead, *got = _read_back(out.loss, out.exact, n_dead, hints, each)
            if exact:
                break
        else:
            raise TrainingError(
                f"SAE {self.names[i]}'s training selection was not exact even when redone with "
                f"Plan(exact=True); its select must select exactly then"
            )
        if not finite:
            self._not_finite(i, x)
        got = iter(got)
        cut = next(got) if out.cut is not None else None
        count = next(got) if out.count is not None else None
        entries = out.x.shape[0] * sae.cfg.d_sae
        self.hints[i].remember(cut, out.density if count is None else count / entries)
        return out, since, int(n_dead)

    def restore_hints(self, records: list[dict | None]) -> None:
        """Each SAE's hints from a checkpoint's records (None: none)."""
        self.hints = [fast.Hints.from_record(h) for h in records]

    def _not_finite(self, i: int, x: torch.Tensor):
        # NaN in x makes every loss NaN: which of the two it was
        if not bool(torch.isfinite(x).all()):
            raise TrainingError(
                self._nan_message("the input activations", "replace or re-capture them")
            )
        raise TrainingError(
            self._nan_message(f"the loss of SAE {self.names[i]}", "lower the learning rate")
        )

    def _nan_message(self, what: str, fix: str) -> str:
        ck = self.latest_checkpoint()
        kept = (
            f"the last good checkpoint is kept at {ck}"
            if ck
            else "no checkpoint had been written yet"
        )
        return (
            f"NaN/inf in {what} at step {self.step} (batch {self.step}, tokens "
            f"{self.tokens:,}); {kept}. Fix: {fix}."
        )

    @staticmethod
    def _values(out, extra: dict, dead_frac: float) -> dict:
        """An eager step's figures as StepStats reads them (tensors, or functions that make one,
        read when asked)."""
        return {
            "loss": out.loss,
            **out.terms,
            "nmse": lambda x=out.x.detach(), x_hat=out.x_hat.detach(): nmse_tensor(
                x.float(), x_hat.float()
            ),
            "l0": lambda l0=out.l0: l0.float().mean(),
            "dead_frac": dead_frac,
            "theta": extra.get("theta", float("nan")),
        }

    @torch.no_grad()
    def _log(self, stats) -> list[StepStats]:
        rows = []
        log_now = self.step % max(1, self.tc.log_every) == 0 or self.step == self.tc.total_steps
        for i, (values, lr) in enumerate(stats):
            row = StepStats(
                {
                    "step": self.step,
                    "tokens": self.tokens,
                    "loss": values["loss"],
                    "lr": lr,
                    **{k: v for k, v in values.items() if k != "loss"},
                }
            )
            if log_now:
                self.logs[i].append(dict(row))
            rows.append(row)
        return rows


def unique_names(cfgs) -> list[str]:
    """Each SAE's name, made unique: by its hook where SAEs of one name train at several hooks,
    else by its place."""
    names = [c.name for c in cfgs]
    hooked = [f"{c.name}_{c.hook_name}" for c in cfgs]
    if len(set(hooked)) == len(cfgs):
        return [n if names.count(n) == 1 else h for n, h in zip(names, hooked)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _read_back(
    loss: torch.Tensor, exact: torch.Tensor | None, n_dead: torch.Tensor, hints: list, each: bool
) -> list:
    """[loss is finite, the selection was exact, n_dead, *hints] as numbers: one transfer
    (optim.stack_scalars: one operator), or with `each` (on the CPU, where a read-back costs
    nothing) one .item() each, which is cheaper there."""
    if each:
        return [
            math.isfinite(loss.item()),
            exact is None or bool(exact),
            int(n_dead),
            *(float(v) for v in hints),
        ]
    got = optim.stack_scalars([loss, n_dead, *hints, *([] if exact is None else [exact])]).tolist()
    return [math.isfinite(got[0]), exact is None or bool(got[-1]), got[1], *got[2 : 2 + len(hints)]]


def train(
    data,
    cfgs: SAEConfig | Sequence[SAEConfig],
    train_cfg: TrainConfig | None = None,
    out: str | Path | None = None,
    hook: str | None = None,
    resume: bool = True,
    **kwargs,
) -> TrainResult:
    """Train SAE(s) on activations (store, folder, tensor, .npy or .safetensors). See
    Trainer.fit."""
    cfgs = [cfgs] if isinstance(cfgs, SAEConfig) else list(cfgs)
    tc = train_cfg or TrainConfig()
    with contextlib.ExitStack() as held:
        # before the SAEs take memory: a run whose outputs cannot be written never starts
        if out is not None:
            claim = lambda: checkpoints.claim_output(
                held, Path(out), cfgs, tc.keep_checkpoints, origin_of(data)
            )
            D.on_rank0(claim)
        trainer = Trainer(cfgs, tc, out)
        trainer.claimed = out is not None
        return trainer.fit(data, hook=hook, resume=resume, **kwargs)
