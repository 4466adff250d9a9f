"""What the trainer tells an SAE's training loss about one step (`Step`): settings passed as an
argument, so that nothing outside an SAE sets attributes on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """One training step's settings. `Step()` is a plain step: AuxK on, everything selected
    exactly."""

    aux: bool = True  # AuxK runs this step (the trainer keeps it to cfg.aux_every)
    # the previous step's cut: where the batch top-k looks first
    cut_hint: float | torch.Tensor | None = None
    # the previous step's share of active entries: the path and entry slots
    density_hint: float | None = None
    # select without reading back from the device; None: off the CPU only
    sync_free: bool | None = False
    # select exactly: a redo of a step whose selection without read-backs was not exact
    exact: bool = False
    # dead latents the trainer counted after the last step (None: count them)
    n_dead: int | None = None
    # a recorded step's fixed number of AuxK slots (saekit.train.graphs)
    aux_slots: int | None = None
    distributed: bool = False  # under torch.distributed: batch-coupled terms use the global batch

    def without_read_backs(self, device: torch.device) -> bool:
        """Whether this step's selection may skip its read-backs (and say whether it was exact)."""
        free = self.sync_free if self.sync_free is not None else device.type != "cpu"
        return free and not self.distributed and not self.exact


PLAIN = Step()
