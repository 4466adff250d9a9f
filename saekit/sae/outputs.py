"""What an SAE gives back: `Selection` (the entries `select` keeps), `ForwardOutput` (the code and
reconstruction of `SAE.forward`) and `TrainOutput` (a training loss, its terms and the statistics
the trainer keeps)."""

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
