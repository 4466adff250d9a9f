"""What the trainer tells an SAE's training loss about one step (`Step`): what the algorithm needs,
passed as an argument, so that nothing outside an SAE sets attributes on it. How fast the step runs
is the speed layer's business (saekit.sae.fast.hints.Plan), not the architecture's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One training step. `Step()` is a plain step: AuxK on, one process."""

    aux: bool = True  # AuxK runs this step (the trainer keeps it to cfg.aux_every)
    distributed: bool = False  # under torch.distributed: batch-coupled terms use the global batch


PLAIN = Step()
