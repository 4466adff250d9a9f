"""Sparse autoencoders: one base, five architectures, and their files.

reference.py      the algorithms in plain PyTorch, to read first (tests hold the rest to it)
config.py         SAEConfig, the registry of architectures by name
step.py           Step: what the trainer tells a training loss about one step
outputs.py        Selection, ForwardOutput, TrainOutput
selections.py     the exact selections: batch_topk, topk, above (the reference's names)
scaling.py        input scaling: per token, dataset-wide or none (mixed into SAE)
auxk.py           dead latents and AuxK (mixed into SAE)
base.py           SAE: encoder/decoder, the reference training loss, saving
theta.py          BatchTopK's inference threshold θ, estimated in one place
architectures/    BatchTopK, TopK, JumpReLU, ReLU-L1, Matryoshka BatchTopK, one file each; make_sae
fast/             the speed layer: the sparse training paths and what they are made of
formats.py        SAELens and sparsify files as plain dicts and tensors, both ways
folders.py        load_sae (saekit, SAELens or sparsify folders), save_sparsify
"""

from .architectures import (
    ARCHS,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    TopKSAE,
    make_sae,
)
from .base import SAE
from .config import (
    ARCHITECTURES,
    NORMALIZATIONS,
    SAEConfig,
    SAEConfigError,
    architecture,
    register,
    resolve_group_sizes,
)
from .folders import load_sae, save_sparsify
from .formats import CFG_FILE, SPARSIFY_WEIGHTS, WEIGHTS_FILE
from .outputs import ForwardOutput, Selection, TrainOutput
from .selections import batch_topk
from .step import Step

__all__ = [
    "ARCHS",
    "ARCHITECTURES",
    "NORMALIZATIONS",
    "CFG_FILE",
    "WEIGHTS_FILE",
    "SPARSIFY_WEIGHTS",
    "SAE",
    "SAEConfig",
    "SAEConfigError",
    "BatchTopKSAE",
    "TopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "MatryoshkaSAE",
    "ForwardOutput",
    "TrainOutput",
    "Selection",
    "Step",
    "architecture",
    "register",
    "make_sae",
    "load_sae",
    "save_sparsify",
    "resolve_group_sizes",
    "batch_topk",
]
