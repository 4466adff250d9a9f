"""Sparse autoencoders: one base, five architectures, and their files.

    config.py         SAEConfig, the registry of architectures by name
    kernels.py        selections, sparse codes, the sparse encoder's autograd, exact batch top-k (also without
                      read-backs), JumpReLU steps
    auxk.py           dead latents and AuxK (mixed into SAE)
    scaling.py        input scaling: per token, dataset-wide or none (mixed into SAE)
    base.py           SAE: encoder/decoder, the fast and reference training paths, saving
    architectures.py  BatchTopK, TopK, JumpReLU, ReLU-L1, Matryoshka BatchTopK (each with its facts); make_sae
    formats.py        SAELens and sparsify files as plain dicts and tensors, both ways
    folders.py        load_sae (saekit, SAELens or sparsify folders), save_sparsify
"""
from .architectures import ARCHS, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, TopKSAE, make_sae
from .base import SAE, ForwardOutput, TrainOutput
from .config import ARCHITECTURES, NORMALIZATIONS, SAEConfig, SAEConfigError, architecture, register, resolve_group_sizes
from .folders import load_sae, save_sparsify
from .formats import CFG_FILE, SPARSIFY_WEIGHTS, WEIGHTS_FILE
from .kernels import Selection, SparseCode, batch_topk, sparse_decode

__all__ = ["ARCHS", "ARCHITECTURES", "NORMALIZATIONS", "CFG_FILE", "WEIGHTS_FILE", "SPARSIFY_WEIGHTS", "SAE",
           "SAEConfig", "SAEConfigError", "BatchTopKSAE", "TopKSAE", "JumpReLUSAE", "ReLUSAE", "MatryoshkaSAE",
           "ForwardOutput", "TrainOutput", "Selection", "SparseCode", "architecture", "register", "make_sae",
           "load_sae", "save_sparsify", "resolve_group_sizes", "batch_topk", "sparse_decode"]
