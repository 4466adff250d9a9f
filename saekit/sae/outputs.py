"""What an SAE gives back: `ForwardOutput` (the code and reconstruction of `SAE.forward`) and `TrainOutput` (a
training path's loss, its terms and the statistics the trainer keeps)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class ForwardOutput(NamedTuple):
    z: torch.Tensor  # [batch, d_sae] code
    x_hat: torch.Tensor  # [batch, d_in] reconstruction in input space


class TrainOutput(NamedTuple):
    loss: torch.Tensor
    terms: dict  # name -> scalar tensor (detached), e.g. mse, aux, sparsity
    x_hat: torch.Tensor  # [batch, d_in], in the normalised space the loss uses
    x: torch.Tensor  # [batch, d_in] normalised input
    fired: torch.Tensor  # [d_sae] bool: latents active in this batch
    l0: torch.Tensor  # [batch] active latents per token
    cut: torch.Tensor | None = None  # the selection's cut (see kernels.Selection): BatchTopK's theta sample
    path: str = "reference"  # which path made it: "reference" (dense) or "sparse" (fast_loss on the sparse kernels)
    exact: torch.Tensor | None = None  # 0-dim bool: False where a selection made without read-backs was not exact
    # and the step must be redone with redo_exact set (see kernels.batch_topk_static); None: exact by construction
    cut_value: float | None = None  # `cut` as a number, where the trainer has read it back (with its flags)
    density: float | None = None  # active entries / (batch x d_sae) where the host knows it (a sparse path's sizes)
    count: torch.Tensor | None = None  # the entries a sparse path found without a read-back (kernels.Entries.count)
    count_value: float | None = None  # `count` as a number, read back by the trainer with its flags
