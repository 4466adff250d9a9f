"""Each architecture's label and colour, as every figure shows them."""

from __future__ import annotations

from ..sae import ARCHITECTURES


def arch_label(arch: str) -> str:
    """The architecture's name for people (a fact of its class), or the name itself if unknown."""
    cls = ARCHITECTURES.get(arch)
    return cls.label if cls else arch


def arch_color(arch: str | None) -> str | None:
    """The architecture's colour in every figure (a fact of its class)."""
    cls = ARCHITECTURES.get(arch)
    return cls.color if cls else None
