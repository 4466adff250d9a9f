"""The speed layer, behind one boundary: everything that makes training fast without changing what
it computes. The trainer calls `training_loss` with a `Plan` made from its `Hints`; nothing else
hands the speed layer hints, and the architectures know nothing of it.

    hints.py     Hints (what a step tells the next) and Plan (one step's speed settings)
    index.py     CodeIndex and SparseCode: a sparse code's entries grouped by row and by latent
    autograd.py  the sparse encoder's and decoder's autograd, JumpReLU's threshold
                 pseudo-gradients on entries, AuxK's dead columns folded into them
    select.py    the training selection and the entries above a bound, each also without
                 read-backs in fixed shapes sized by one rule (`slots`)
    auxk.py      AuxK over the dead latents' columns only
    paths.py     each architecture's sparse training loss, when the sparse path pays, and
                 `training_loss`, which picks the path

An architecture names its path (`SAE.fast_path`); the reference path (`SAE.reference_loss`, and
saekit/sae/reference.py) is what tests check the sparse paths against. Recording the training step
as CUDA graphs lives beside the trainer (saekit/train/graphs.py), since it records the optimiser's
step too.
"""

from .hints import Hints, Plan
from .index import CodeIndex, SparseCode
from .paths import (
    SPARSE_MAX_DENSITY,
    SPARSE_MIN_LATENTS,
    THRESHOLDED,
    FastOutput,
    sparse_pays,
    step_shape,
    training_loss,
)
from .select import slots

__all__ = [
    "Hints",
    "Plan",
    "CodeIndex",
    "SparseCode",
    "SPARSE_MAX_DENSITY",
    "SPARSE_MIN_LATENTS",
    "THRESHOLDED",
    "FastOutput",
    "sparse_pays",
    "step_shape",
    "training_loss",
    "slots",
]
