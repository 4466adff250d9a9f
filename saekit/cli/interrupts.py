"""What a command interrupted with Ctrl-C has kept, and how to go on: one line, no traceback."""

from __future__ import annotations

from pathlib import Path

AGAIN = "run the same command to resume"


def _training(out) -> str:
    from ..train import checkpoints

    last = checkpoints.latest(Path(out) / "checkpoints")
    if last is None:
        return f"no checkpoint was written in {out} yet; run the same command to start again"
    step = int(checkpoints.progress(last)["step"])
    return f"the checkpoint at step {step:,} is kept in {last}; {AGAIN} from it"


KEPT = {
    "capture": lambda a: f"the shards finished so far are kept in {a.out}; {AGAIN}",
    "train": lambda a: _training(a.out),
    "sweep": lambda a: _training(a.out),
    "demo": lambda a: f"what finished is kept in {a.out}; {AGAIN}",
    "bench": lambda a: f"the results written so far are kept in {a.out}; {AGAIN}",
    "export-store": lambda a: f"an export is written whole or not at all: {a.out} is as it was",
    "calibrate": lambda a: f"{a.sae_dir} is as it was (theta is written at the end)",
    "notebooks": lambda a: f"each notebook in {a.dir} is whole; run the same command again",
}


def interrupted(args) -> str:
    """The line that ends an interrupted command: what was kept and how to go on."""
    kept = KEPT.get(args.cmd)
    return f"interrupted; {kept(args) if kept else 'nothing was written'}"
