"""Training SAEs on a stream of activations.

    config.py       TrainConfig, the default learning rate, the schedule
    sources.py      batches from a store, a tensor or a file; read-ahead
    checkpoints.py  atomic, pickle-free checkpoints that resume to the same weights
    init.py         an SAE's start from a sample: input scale, b_dec at the geometric median
    trainer.py      Trainer (several SAEs, one stream) and train()
    run.py          the Trainer's run: the fit loop, checkpoints, θ at the end, outputs
    optim.py        the step's clipping (folded into fused Adam), zero-grad and read-back stack
    graphs.py       the training step recorded once and replayed as CUDA graphs (step_graphs)
    results.py      StepStats (one step's figures, read when asked for) and TrainResult

Distributed training (torchrun) goes through saekit.distributed.
"""

from .config import LR_BASE, TrainConfig, TrainingError, default_lr, lr_factor
from .init import geometric_median
from .sources import Prefetcher, StoreSource, TensorSource, TimedBatches, as_source
from .trainer import Trainer, TrainResult, train

__all__ = [
    "LR_BASE",
    "TrainConfig",
    "TrainingError",
    "default_lr",
    "lr_factor",
    "Prefetcher",
    "StoreSource",
    "TensorSource",
    "TimedBatches",
    "as_source",
    "Trainer",
    "TrainResult",
    "geometric_median",
    "train",
]
