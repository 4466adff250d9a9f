"""The architectures, one file each. Each is one class that states its facts (name, SAELens names,
whether it has k or θ, ...), says what it selects and what its sparsity term is, and registers
itself by name; adding an architecture is one file here plus its tests."""

from __future__ import annotations

from ..base import SAE
from ..config import ARCHITECTURES, SAEConfig, architecture
from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .relu import ReLUSAE
from .topk import TopKSAE

# in the order registered: BatchTopK, TopK, JumpReLU, ReLU-L1, Matryoshka
ARCHS = tuple(ARCHITECTURES)

__all__ = [
    "ARCHS",
    "BatchTopKSAE",
    "TopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "MatryoshkaSAE",
    "make_sae",
]


def make_sae(cfg: SAEConfig | None = None, **kwargs) -> SAE:
    """Build an SAE from a config (or keyword fields of one)."""
    cfg = cfg or SAEConfig(**kwargs)
    return architecture(cfg.arch)(cfg)
