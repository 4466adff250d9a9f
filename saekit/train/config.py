"""What a training run is: `TrainConfig`, the default learning rate and the schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


class TrainingError(RuntimeError):
    """Training stopped: non-finite values, or inputs that do not fit the SAEs."""


@dataclass
class TrainConfig:
    """How to train (shared by every SAE trained on the stream)."""

    total_tokens: int = 2_000_000
    batch_size: int = 4096
    # None: default_lr(d_sae) for each SAE (see there); a number: that rate for every SAE
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay_frac: float = 0.2  # linear decay to zero over the final fraction of steps
    grad_clip: float = 1.0
    b_dec_init: str = "geometric_median"  # or "mean" or "zeros"
    init_tokens: int = 16_384  # tokens used for b_dec init and the dataset-wide scale
    seed: int = 0
    device: str | None = None  # None: cuda if available, else cpu
    # bf16 autocast of the matrix products; None: on where the device multiplies bf16 in hardware
    # and (on a CPU) the SAE's step is large enough for it to pay (autocast_default), off elsewhere;
    # False: fp32 throughout
    autocast: bool | None = None
    # the sparse training path (saekit.sae.fast) where an architecture has one and it pays
    fast: bool = True
    # select without reading back from the device, redoing the rare step that could not be
    # proved exact; None: on an accelerator only, where each read-back stalls the host (on the
    # CPU it costs nothing)
    sync_free: bool | None = None
    # BatchTopK: re-estimate theta with the final weights over this many batches
    calibrate_batches: int = 20
    # steps (0: only at the end); a failure late in a run loses at most this many
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    # the store's shuffle buffer (rows in RAM; see ActivationStore.batches)
    buffer_rows: int = 131_072
    # batches read ahead in a background thread (pinned + async copy on CUDA); 0: off; None: 2 on
    # CUDA, off on CPU, where the thread competes with the step for the cores (2 cores: data-loading
    # share 27% without, 46% with)
    prefetch: int | None = None
    progress: bool = True
    # "cuda": each SAE's step recorded once as CUDA graphs and replayed (saekit.train.graphs): one
    # launch instead of ~150 a step, for a step bound by the host; "eager": the same fixed-shape
    # phases, unrecorded, on any device (checks); "off": the eager step. Off by default until
    # measured on a GPU (benchmarks/gpu.py)
    step_graphs: str = "off"
    wandb_project: str | None = None  # logs to wandb only if installed and this is set

    def __post_init__(self):
        rules = {
            "total_tokens": (self.total_tokens >= 1, "at least 1"),
            "batch_size": (self.batch_size >= 1, "at least 1"),
            "lr": (self.lr is None or 0 < self.lr < math.inf, "positive, or None for the default"),
            "warmup_steps": (self.warmup_steps >= 0, "0 or more"),
            "decay_frac": (0 <= self.decay_frac <= 1, "between 0 and 1"),
            "grad_clip": (0 < self.grad_clip < math.inf, "positive"),
            "init_tokens": (self.init_tokens >= 1, "at least 1"),
            "checkpoint_every": (self.checkpoint_every >= 0, "0 (only at the end) or more"),
            "keep_checkpoints": (self.keep_checkpoints >= 1, "at least 1"),
            "log_every": (self.log_every >= 1, "at least 1"),
            "calibrate_batches": (self.calibrate_batches >= 0, "0 or more"),
            "buffer_rows": (self.buffer_rows >= 1, "at least 1"),
        }
        bad = [
            f"{k}={getattr(self, k)!r} (must be {rule})"
            for k, (ok, rule) in rules.items()
            if not ok
        ]
        if bad:
            raise TrainingError(f"invalid training settings: {'; '.join(bad)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def uses_autocast(self, device, sae_cfg, batch: int | None = None) -> bool:
        """Whether an SAE (its SAEConfig) trains on `device` under bf16 autocast, with batches of
        `batch` rows (None: batch_size; under torch.distributed pass a rank's share). autocast
        None: autocast_default."""
        if self.autocast is not None:
            return bool(self.autocast)
        return autocast_default(device, (batch or self.batch_size, sae_cfg.d_in, sae_cfg.d_sae))

    def lr_for(self, d_sae: int) -> float:
        """The learning rate of an SAE with d_sae latents: `lr` if set, else default_lr(d_sae)."""
        return float(self.lr) if self.lr is not None else default_lr(d_sae)


def cpu_has_bf16_hardware() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX-512 BF16 dot products (Intel since Cooper
    Lake, with AMX tiles since Sapphire Rapids; AMD since Zen 4), as torch's own CPU check reports.
    There bf16 autocast speeds a large enough CPU training step up
    (benchmarks/results/autocast_cpu.txt). Elsewhere bf16 products have no hardware support, and
    autocast stays off."""
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return check is not None and bool(check())
    except RuntimeError:
        return False


# the CLI's --precision: its TrainConfig.autocast
PRECISIONS = {"auto": None, "fp32": False, "bf16": True}


# bf16 autocast's casts cost a fixed time per product and its products save in proportion to the
# work: from this much work up it paid on both CPUs measured (benchmarks/results/autocast_cpu.txt)
CPU_BF16_MIN_WORK = 2**25  # batch x d_in x d_sae


def bf16_pays_on_cpu(batch: int, d_in: int, d_sae: int) -> bool:
    """Whether a step of this shape is large enough for bf16 autocast to pay on a CPU
    (CPU_BF16_MIN_WORK)."""
    return batch * d_in * d_sae >= CPU_BF16_MIN_WORK


def autocast_default(device, shape: tuple[int, int, int]) -> bool:
    """TrainConfig.autocast=None on this device, for a step of `shape` (batch, d_in, d_sae): bf16
    autocast where bf16 matrix products run in hardware, on a CUDA GPU with bf16, and on a CPU with
    AVX-512 BF16 where the step is large enough for it to pay (bf16_pays_on_cpu; the held-out NMSE
    is the same within its interval: benchmarks/results/autocast_cpu.txt); fp32 elsewhere."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_hardware() and bf16_pays_on_cpu(*shape)


# default_lr at 2^14 latents: 4x sparsify's 2e-4, the best of a sweep
# (benchmarks/results/lr_default_cpu.txt)
LR_BASE = 8e-4


def default_lr(d_sae: int) -> float:
    """LR_BASE / sqrt(d_sae / 2^14): larger for small dictionaries, which the paper's fixed 3e-4
    (meant for 12k+ latents and a billion tokens) under-trains in short runs
    (benchmarks/results/lr_default_cpu.txt)."""
    return LR_BASE / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_frac: float) -> float:
    """Linear warmup to 1, flat, then linear decay to 0 over the last `decay_frac` of the steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_frac)
    decay_start = total_steps - decay_steps
    if decay_steps and step >= decay_start:
        return max(0.0, (total_steps - step) / decay_steps)
    return 1.0
