"""What one training step tells the next about where to look (`Hints`): the trainer keeps one per
SAE and hands it to the fast paths; checkpoints keep it, so a resumed run takes the paths an
uninterrupted one takes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Hints:
    """One SAE's hints for its next step."""

    # the previous step's cut: where the batch top-k looks first (a device tensor in a recorded
    # step, which updates it without a read-back)
    previous_cut: float | torch.Tensor | None = None
    # the previous step's share of active entries: which path pays, and its entry slots
    previous_density: float | None = None

    def as_record(self) -> dict:
        """The hints as numbers, for a checkpoint."""
        as_number = lambda v: float(v) if isinstance(v, torch.Tensor) else v
        return {k: as_number(v) for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict | None) -> Hints:
        """Hints from a checkpoint's record (None or an older record: no hints)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (record or {}).items() if k in names})
