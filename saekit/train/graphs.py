"""The training step recorded once and replayed: CUDA graphs for every architecture's training step
on one GPU (`TrainConfig.step_graphs`).

Why: on a GPU the sparse step is bound by the host, which launches over a hundred kernels a step
(benchmarks/results/profile_step_cuda.txt). A CUDA graph launches a recorded step's kernels with one
call. A step can be recorded when:
- its shapes are fixed and nothing is read back: the selections without read-backs
  (saekit.sae.fast.select), Matryoshka's group decodes from one decode, and AuxK's dead latents in a
  fixed number of slots (`Plan.aux_slots`);
- every value that changes from step to step lives in a device tensor, not in a Python number: the
  learning rate, and the selection's hint (the previous step's cut).

The step is two phases with the trainer's one read-back between them:
- A: the loss, its gradients, the next dead-latent counters and the step's figures (`report`). One
  graph per number of AuxK slots and per `fast.step_shape` (a thresholded code's entry slots),
  both sized by `fast.slots`' coarse grid, so a run records a few dozen at most. A step whose
  shape cannot be recorded (the dense path, no hint yet) runs phase A unrecorded.
- The read-back of the report says whether the loss is finite, whether the selection was exact, the
  dead count (the next step's AuxK slots) and a thresholded code's count of entries (its next
  slots). A step whose selection was not exact runs A again, not recorded, with Plan(exact=True);
  its results land in the same buffers.
- B: the decoder constraint, clipping, Adam (capturable, its rate a tensor), the decoder's norm, the
  counters, theta and the next hint.

Mode "cuda" records CUDA graphs. Mode "eager" runs the same phases without recording, on any device:
on the CPU the test suite checks that they train to the eager trainer's weights, and that two steps
dispatch the same operators with the same arguments (what a recording freezes).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable

import torch

from ..metrics.reconstruction import nmse_tensor
from ..sae import SAE, Step, fast
from ..sae import theta as T
from ..sae.fast.auxk import AUX_UNIT
from .config import TrainingError
from .optim import clip_in_step, stack_scalars

MODES = ("off", "cuda", "eager")
# phase A's figures
REPORT = ("finite", "exact", "n_dead", "count", "loss", "mse", "sparsity", "aux", "nmse", "l0")
TERMS = ("mse", "sparsity", "aux")  # the loss terms a recordable SAE reports (SAE.train_output)
# runs of a phase before it is recorded: CUDA's lazy set-up (cuBLAS workspaces,
# ...) must happen first
WARMUP = 2


def why_not(sae: SAE, batch: int, sparse_path: bool, world: int) -> str | None:
    """Why this SAE's training step cannot be recorded (None: it can)."""
    if not sae.graph_safe:
        return f"{sae.label}'s training step reads values back from the device"
    if not sparse_path:
        return "the reference path (fast=False) reads values back from the device"
    if world > 1:
        return "under torch.distributed the selection agrees its cut between ranks on the host"
    # too few latents for the sparse path, however sparse the code
    if not fast.sparse_pays(sae, 0, batch):
        return (
            f"at d_sae {sae.cfg.d_sae} the step takes the dense "
            "reference path, which reads values back"
        )
    return None


class GraphedStep:
    """One SAE's training step as two phases recorded as CUDA graphs (mode "cuda") or run as they
    are ("eager"). Made by the Trainer once the SAE has its hints (BatchTopK's previous cut); from
    then on it owns the SAE's gradients (kept, zeroed in place), its optimiser's rates (tensors) and
    the cut hint (a tensor in `hints`, the trainer's Hints for this SAE)."""

    def __init__(
        self,
        sae: SAE,
        opt: torch.optim.Optimizer,
        n_tokens: int,
        grad_clip: float,
        autocast: bool,
        mode: str,
        n_dead: int,
        hints: fast.Hints,
    ):
        if mode not in ("cuda", "eager"):
            raise ValueError(f"GraphedStep mode {mode!r}: use 'cuda' or 'eager'")
        dev = sae.W_dec.device
        self.sae, self.opt, self.n_tokens, self.grad_clip, self.autocast = (
            sae,
            opt,
            n_tokens,
            grad_clip,
            autocast,
        )
        self.capture = mode == "cuda"
        self.n_dead = int(n_dead)
        self.hints = hints
        self.report = torch.zeros(len(REPORT), dtype=torch.float64, device=dev)
        self.since = sae.tokens_since_fired.clone()  # the counters after phase A's step
        self.cut = torch.zeros((), device=dev)  # phase A's cut, float32 as theta
        self.hint = None
        if sae.has_theta:  # the next selection's hint, updated on the device by phase B
            self.hint = torch.full((), float(hints.previous_cut), device=dev)
            hints.previous_cut = self.hint
        for p in sae.parameters():  # gradients in fixed memory, zeroed in place by phase A
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # the rate as a tensor the trainer fills each step: float32 on CUDA (fused Adam reads it
        # there as float), float64 on the CPU (read as a double there: the same updates as a rate
        # given as a number)
        lr_dtype = torch.float32 if dev.type == "cuda" else torch.float64
        for g in opt.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), dtype=lr_dtype, device=dev)
            g["capturable"] = g["capturable"] or self.capture
        self.x: torch.Tensor | None = None  # the static input batch
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.runs: Counter = Counter()  # unrecorded runs of each phase key
        # one memory pool for every graph
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        # the warm-up runs' stream
        self.side = torch.cuda.Stream(device=dev) if self.capture else None

    # -- one step -------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, aux: bool) -> tuple[bool, dict]:
        """One optimiser step on batch x (aux: AuxK is due). Returns (whether the loss was finite,
        the step's figures). Where it was not finite, phase B has not run: the weights are the
        step's starting ones."""
        sae = self.sae
        if self.x is None or self.x.shape != x.shape or self.x.dtype != x.dtype:
            # a new shape: record anew
            self.x, self.graphs, self.runs = torch.empty_like(x), {}, Counter()
        self.x.copy_(x)
        due = sae.aux_wanted(Step(aux=aux))
        room = fast.slots(self.n_dead, AUX_UNIT, sae.cfg.d_sae) if due else 0
        step = Step(aux=due)
        plan = self.hints.plan(sync_free=True, n_dead=self.n_dead, aux_slots=room)
        shape = fast.step_shape(sae, x.shape[0], plan)
        # this step cannot be recorded (the dense path, no hint yet): phase A as it is
        if shape is None:
            self._phase_a(step, plan, recordable=False)
        else:
            self._run(("A", room, *shape), lambda: self._phase_a(step, plan))
        finite, exact, n_dead, count, *figures = self.report.tolist()  # the step's one read-back
        if not exact:  # not recorded: the exact selection reads back
            self._phase_a(step, dataclasses.replace(plan, exact=True), recordable=False)
            finite, exact, n_dead, count, *figures = self.report.tolist()
            if not exact:
                raise TrainingError(
                    f"SAE {sae.cfg.name}'s training selection was not exact even when redone with "
                    f"Plan(exact=True); its select must select exactly then"
                )
        if not finite:
            return False, {}
        self._run(("B",), self._phase_b)
        self.n_dead = int(n_dead)
        if sae.fast_path in fast.THRESHOLDED:  # the next step's entry slots
            self.hints.previous_density = count / (x.shape[0] * sae.cfg.d_sae)
        values = dict(zip(REPORT[4:], figures))
        values["dead_frac"] = n_dead / sae.cfg.d_sae
        values["theta"] = sae.threshold.clone() if sae.has_theta else float("nan")
        return True, values

    def _run(self, key: tuple, phase: Callable[[], None]) -> None:
        """Run a phase: as it is in mode "eager"; else its first WARMUP runs on a side stream, then
        recorded once and replayed from then on."""
        if not self.capture:
            phase()
            return
        graph = self.graphs.get(key)
        if graph is None:
            if self.runs[key] < WARMUP:
                self.runs[key] += 1
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    phase()
                torch.cuda.current_stream().wait_stream(self.side)
                return
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: the Prefetcher's thread keeps copying batches to the GPU while a
                # phase is recorded
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    phase()
            except Exception as err:
                raise TrainingError(
                    f"recording SAE {self.sae.cfg.name}'s step phase {key} as a CUDA graph failed "
                    f"({type(err).__name__}: {err}); train with step_graphs='off'"
                ) from err
            self.graphs[key] = graph
        graph.replay()

    # -- the two phases -------------------------------------------------------------------------
    def _phase_a(self, step: Step, plan: fast.Plan, recordable: bool = True) -> None:
        """Loss and gradients of the batch in self.x, the next counters in self.since, the cut in
        self.cut, and REPORT's figures in self.report. recordable: the step's shape said it takes
        the sparse path."""
        sae = self.sae
        # in place: the gradients stay where phase B reads them
        self.opt.zero_grad(set_to_none=False)
        with torch.autocast(
            self.x.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False
        ):
            out = fast.training_loss(sae, self.x, step, plan)
        out.loss.backward()
        if (recordable and out.path != "sparse") or set(out.terms) != set(TERMS):
            raise TrainingError(
                f"SAE {sae.cfg.name}'s step is not the recordable sparse step (path {out.path}, "
                f"terms {sorted(out.terms)}); train with step_graphs='off'"
            )
        since, n_dead = sae.next_dead_counters(out.fired, self.n_tokens)
        self.since.copy_(since)
        if out.cut is not None:
            self.cut.copy_(out.cut)
        loss = out.loss.detach()
        exact = (
            out.exact
            if out.exact is not None
            else torch.ones((), dtype=torch.bool, device=loss.device)
        )
        # the entries found without a read-back; else known to the host (not in a recording)
        count = out.count
        if count is None:
            known = 0.0 if out.density is None else out.density * out.x.shape[0] * sae.cfg.d_sae
            count = torch.full((), known, device=loss.device)
        figures = [
            torch.isfinite(loss),
            exact,
            n_dead,
            count,
            loss,
            *(out.terms[t] for t in TERMS),
            nmse_tensor(out.x.detach().float(), out.x_hat.detach().float()),
            out.l0.float().mean(),
        ]
        stack_scalars(figures, out=self.report)

    @torch.no_grad()
    def _phase_b(self) -> None:
        """The optimiser step and what follows it (Trainer.train_step's order)."""
        sae = self.sae
        sae.remove_parallel_grad()
        if self.grad_clip:
            clip_in_step(self.opt, list(sae.parameters()), self.grad_clip)
        self.opt.step()
        sae.normalize_decoder()
        sae.tokens_since_fired.copy_(self.since)
        if self.hint is not None:
            T.running_update(sae.threshold, sae.threshold_updates, self.cut, sae.cfg.threshold_beta)
            self.hint.copy_(self.cut)


class StepGraphs:
    """The trainer's recorder: each SAE's GraphedStep once the SAE is ready, and the SAEs that
    cannot be recorded, warned about once and left on the eager step."""

    def __init__(self, tc, n_saes: int):
        if tc.step_graphs not in MODES:
            raise TrainingError(
                f"unknown step_graphs {tc.step_graphs!r}; use one of {', '.join(MODES)}"
            )
        self.tc = tc
        self.steps: list[GraphedStep | None] = [None] * n_saes
        self.refused: set[int] = set()

    def __getitem__(self, i: int) -> GraphedStep | None:
        return self.steps[i]

    def ready(
        self,
        i: int,
        sae: SAE,
        opt,
        n_tokens: int,
        batch: int,
        autocast: bool,
        world: int,
        hints: fast.Hints,
        n_dead: int | None,
    ) -> GraphedStep | None:
        """SAE i's GraphedStep where step_graphs asks for one and the SAE is ready (BatchTopK:
        once it has a previous cut); None where it is off, refused, or not yet."""
        tc = self.tc
        if self.steps[i] is not None or tc.step_graphs == "off" or i in self.refused:
            return self.steps[i]
        if tc.step_graphs == "cuda" and sae.W_dec.device.type != "cuda":
            raise TrainingError(
                f"step_graphs='cuda' records CUDA graphs, but the SAE is on {sae.W_dec.device}; "
                "use step_graphs='off' there (or 'eager' to run the recordable phases unrecorded)"
            )
        reason = why_not(sae, batch, tc.fast, world)
        if reason is not None:
            self.refused.add(i)
            warnings.warn(f"SAE {sae.cfg.name} trains without step_graphs: {reason}", stacklevel=3)
            return None
        if sae.has_theta and hints.previous_cut is None:
            return None  # its first step selects exactly and gives the first hint
        if n_dead is None:
            n_dead = int(sae.dead_mask().sum())
        self.steps[i] = GraphedStep(
            sae, opt, n_tokens, tc.grad_clip, autocast, tc.step_graphs, n_dead, hints
        )
        return self.steps[i]
