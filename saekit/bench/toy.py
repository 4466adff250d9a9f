"""Absorption where the truth is known: a parent/child feature hierarchy ("letters" and the words
under them) with orthonormal feature directions, and two SAEs built by hand over it. The clean SAE
has one latent per feature. In the absorbing SAE, one rare child's latent also writes its parent's
direction, and the parent's latent is shut off whenever that child is present: the child has
absorbed the parent."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..sae import SAE, make_sae
from .letters import LetterData


@dataclass
class AbsorptionToy:
    data: LetterData  # samples as "words", their parent as their "letter"
    features: torch.Tensor  # [n_features, d]: the parents, then each parent's children
    child: np.ndarray  # [n] the child feature active in each sample, -1 for none
    saes: dict[str, SAE]  # "clean" and "absorbing"
    absorbing_latent: int  # the child latent that absorbs parent 0


def absorption_toy(
    n: int = 6000,
    n_parents: int = 4,
    children: int = 3,
    d: int = 32,
    child_rate: float = 0.3,
    absorbed_rate: float = 0.03,
    seed: int = 0,
) -> AbsorptionToy:
    """Samples with exactly one active parent; a child of it is active in `child_rate` of them,
    except parent 0's first child, active in `absorbed_rate` only: too rare to be needed for
    finding parent 0, as absorbed features are in real SAEs."""
    g = torch.Generator().manual_seed(seed)
    n_features = n_parents * (1 + children)
    features = torch.linalg.qr(torch.randn(d, d, generator=g))[0].T[:n_features]
    parent = torch.randint(0, n_parents, (n,), generator=g)
    which = torch.randint(0, children, (n,), generator=g)
    absorbed = n_parents  # parent 0's first child
    child = n_parents + parent * children + which
    rate = torch.where(child == absorbed, absorbed_rate * children, child_rate)
    has_child = torch.rand(n, generator=g) < rate
    coeff = 0.5 + torch.rand(n, 2, generator=g)
    x = coeff[:, :1] * features[parent]
    x += (has_child * 0.6 * coeff[:, 1])[:, None] * features[child]
    x += 0.01 * torch.randn(n, d, generator=g)
    train = np.random.default_rng(seed).random(n) < 0.8
    data = LetterData([f"w{i}" for i in range(n)], parent.numpy(), train, x, skipped={})
    saes = {name: _hand_built(features, absorbed if name == "absorbing" else None) for name in
            ("clean", "absorbing")}  # fmt: skip
    child_of = torch.where(has_child, child, -1).numpy()
    return AbsorptionToy(data, features, child_of, saes, absorbed)


def _hand_built(features: torch.Tensor, absorbing: int | None) -> SAE:
    """One ReLU latent per feature, reading and writing its own direction; with `absorbing`, that
    child's latent fires on the child alone but writes child and parent together, and parent 0's
    latent is switched off by the child."""
    enc, dec = features.clone(), features.clone()
    if absorbing is not None:
        parent, child = features[0], features[absorbing]
        enc[0] = parent - 10 * child
        enc[absorbing] = 4 * child  # strong enough to carry the parent's projection
        dec[absorbing] = (child + parent) / 2**0.5
    n, d = features.shape
    sae = make_sae(arch="relu", d_in=d, d_sae=n, normalize="none", l1_coeff=1e-3)
    sae.set_weights(
        {"W_enc": enc.T, "W_dec": dec, "b_enc": torch.zeros(n), "b_dec": torch.zeros(d)}
    )
    return sae.eval()
