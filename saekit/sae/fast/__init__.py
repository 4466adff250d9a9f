"""The speed layer, behind one boundary: everything that makes training fast without changing what
it computes.

    index.py     CodeIndex and SparseCode: a sparse code's entries grouped by row and by latent
    autograd.py  the sparse encoder's and decoder's autograd, JumpReLU's threshold
                 pseudo-gradients on entries, AuxK's dead columns folded into them
    select.py    the batch top-k looked for above a hint, each row's top-k and the entries
                 above a bound, each also without read-backs in fixed shapes sized by one
                 rule (`slots`)
    auxk.py      AuxK over the dead latents' columns only
    paths.py     each architecture's sparse training loss (`loss`), and when the sparse path pays

An architecture names its path (`SAE.fast_path`); `SAE.training_loss` calls `loss` here, and the
reference path (`SAE.reference_loss`, and saekit/sae/reference.py) is what tests check it against.
Recording the training step as CUDA graphs lives beside the trainer (saekit/train/graphs.py), since
it records the optimiser's step too.
"""

from .index import CodeIndex, SparseCode
from .paths import SPARSE_MAX_DENSITY, SPARSE_MIN_LATENTS, loss, sparse_pays, step_shape
from .select import batch_top, batch_topk, entries, row_top, slots

__all__ = [
    "CodeIndex",
    "SparseCode",
    "SPARSE_MAX_DENSITY",
    "SPARSE_MIN_LATENTS",
    "loss",
    "sparse_pays",
    "step_shape",
    "batch_top",
    "batch_topk",
    "entries",
    "row_top",
    "slots",
]
