"""What a training step and a run give back: `StepStats` (one SAE's figures of one step, read from
the device when first asked for) and `TrainResult` (the trained SAEs, their logs and the run's
timings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..sae import SAE


class StepStats(Mapping):
    """One SAE's statistics of one step (loss, its terms, NMSE, L0, dead fraction, theta, ...),
    computed and read from the device in one transfer the first time any of them is asked for: a
    step whose statistics nobody reads (no callback, no log row due, the progress bar not redrawn)
    neither computes them nor waits for the device. Values that are tensors, or functions that
    make one, are read then; the others are kept as they are."""

    def __init__(self, values: dict):
        self._given, self._values = values, None

    def _load(self) -> dict:
        if self._values is None:
            lazy = {
                k: v() if callable(v) else v
                for k, v in self._given.items()
                if callable(v) or isinstance(v, torch.Tensor)
            }
            read = (
                torch.stack([v.detach().float().reshape(()) for v in lazy.values()]).tolist()
                if lazy
                else []
            )
            got = dict(zip(lazy, read))
            self._values = {k: got.get(k, v) for k, v in self._given.items()}  # in the order given
            self._given = None
        return self._values

    def __getitem__(self, key):
        return self._load()[key]

    def __iter__(self):
        return iter(self._load())

    def __len__(self):
        return len(self._load())


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

    def summary(self) -> str:
        """One line per SAE: steps, tokens and the last logged NMSE, L0 and dead fraction, and
        its folder."""
        lines = []
        for name, log in zip(self.names, self.logs):
            last = log.iloc[-1]
            where = f" -> {self.out / name}" if self.out is not None else ""
            lines.append(
                f"{name}: steps {self.steps}, tokens {self.tokens:,}, nmse {last['nmse']:.4f}, "
                f"l0 {last['l0']:.1f}, dead {last['dead_frac']:.3f}{where}"
            )
        return "\n".join(lines)

    @property
    def data_share(self) -> float:
        """Fraction of the training loop's time spent waiting for data."""
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0
