"""What the trainer tells the fast paths and nothing else: `Hints`, what one training step tells the
next about where to look (the trainer keeps one per SAE; checkpoints keep it, so a resumed run takes
the paths an uninterrupted one takes), and `Plan`, one step's speed settings made from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Plan:
    """One step's speed settings. `Plan()` selects exactly and counts what it needs."""

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

    def without_read_backs(self, device: torch.device, distributed: bool) -> bool:
        """Whether this step's selection may skip its read-backs (and say whether it was exact)."""
        free = self.sync_free if self.sync_free is not None else device.type != "cpu"
        # under torch.distributed the ranks agree the cut on the host
        return free and not distributed and not self.exact


@dataclass
class Hints:
    """One SAE's hints for its next step."""

    # the previous step's cut: where the batch top-k looks first (a device tensor in a recorded
    # step, which updates it without a read-back)
    previous_cut: float | torch.Tensor | None = None
    # the previous step's share of active entries: which path pays, and its entry slots
    previous_density: float | None = None

    def plan(self, **settings) -> Plan:
        """This step's Plan: these hints and the step's own settings (Plan's other fields)."""
        return Plan(cut_hint=self.previous_cut, density_hint=self.previous_density, **settings)

    def remember(self, cut: float | None, density: float | None) -> None:
        """What a step tells the next: its cut (where one was made), its share of active entries."""
        if cut is not None:
            self.previous_cut = cut
        self.previous_density = density

    def as_record(self) -> dict:
        """The hints as numbers, for a checkpoint."""
        as_number = lambda v: float(v) if isinstance(v, torch.Tensor) else v
        return {k: as_number(v) for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict | None) -> Hints:
        """Hints from a checkpoint's record (None or an older record: no hints)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (record or {}).items() if k in names})
