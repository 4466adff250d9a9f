"""What an SAE gives back: `Selection` (the entries `select` keeps), `ForwardOutput` (the code and
reconstruction of `SAE.forward`) and `TrainOutput` (a training path's loss, its terms and the
statistics the trainer keeps)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Selection(NamedTuple):
    """The entries an architecture's `select` keeps of pre-activations a [batch, d_sae]: rows
    (token) and cols (latent) in row-major order (the sparse kernels group by row without sorting),
    and where it cuts by value over the batch (BatchTopK in training) `cut`, the smallest kept
    value: BatchTopK's θ is the mean cut."""

    rows: torch.Tensor
    cols: torch.Tensor
    cut: torch.Tensor | None = None
    # 0-dim bool where a selection without read-backs may not be exact
    exact: torch.Tensor | None = None


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
    cut: torch.Tensor | None = None  # the selection's cut (Selection.cut): BatchTopK's θ sample
    path: str = "reference"  # "reference" (dense) or "sparse" (saekit.sae.fast)
    # 0-dim bool: False where the selection must be redone with Step(exact=True)
    exact: torch.Tensor | None = None
    cut_value: float | None = None  # `cut` as a number, where the trainer has read it back
    density: float | None = None  # active entries / (batch x d_sae) where the host knows it
    count: torch.Tensor | None = None  # the entries a sparse path found without a read-back
    count_value: float | None = None  # `count` as a number, read back by the trainer
