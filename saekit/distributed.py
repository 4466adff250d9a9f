"""Training one SAE on several processes with torch.distributed (DDP).

Launch with `torchrun --nproc_per_node N -m saekit train ...` (or `saekit train --distributed` under
torchrun). Each rank reads its own part of the activation store and holds a replica of every SAE; DDP
all-reduces the gradients. Selection that couples the tokens of a batch is made over the *global* batch:

- BatchTopK keeps the world*B*k largest pre-activations of all ranks together. Each rank sends its
  2*B*k+1 largest values (one all_gather); the cut is the (world*B*k)-th largest of the union, and it is
  exact when every rank's first unsent value lies below it (checked from the same gather). Otherwise the
  ranks gather their full top world*B*k (a second all_gather). Either way a rank keeps its entries at or
  above the cut: the same code as one process on the concatenated batch.
- dead-latent counters see the global batch (fired latents all-reduced with MAX).

So a distributed step gives the weights of one process stepping on the concatenated batch (tested with
the gloo backend on CPU). Checkpoints and outputs are written once, by rank 0; every rank resumes from them.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str | None = None) -> torch.device:
    """Join the process group torchrun describes (env://): NCCL with one GPU per rank, else gloo on CPU."""
    if not launched_by_torchrun():
        raise RuntimeError("distributed training needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR); "
                           "launch with: torchrun --nproc_per_node N -m saekit train ...")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _gather_padded(vals: torch.Tensor, m: int) -> torch.Tensor:
    """[world, m] of every rank's m largest values (descending), padded with -inf."""
    top = vals.topk(min(m, vals.numel())).values if vals.numel() else vals
    buf = torch.full((m,), float("-inf"), dtype=torch.float32, device=vals.device)
    buf[:top.numel()] = top.float()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return torch.stack(out)


def global_batch_cut(local_top: torch.Tensor, n_global: int, share: int) -> tuple[float, bool]:
    """The n_global-th largest value over every rank's `local_top` (each rank's largest candidates).

    Round one gathers `share`+1 values per rank; the cut from the first `share` of each is exact when
    every rank's (share+1)-th value is below it. Returns (cut, exact); when not exact, call again with
    share = n_global on the full local top-n_global.
    """
    g = _gather_padded(local_top, share + 1)
    union = g[:, :share].reshape(-1)
    if union.numel() < n_global:
        return float("-inf"), False
    cut = union.topk(n_global).values[-1]
    return float(cut), bool((g[:, share] < cut).all())


@torch.no_grad()
def all_reduce_fired(fired: torch.Tensor) -> torch.Tensor:
    """Latents that fired on any rank."""
    f = fired.to(torch.uint8)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return f.bool()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (after initialisation from data)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


class LossModule(torch.nn.Module):
    """An SAE whose forward is its training loss, so DDP wraps it (DDP hooks in through forward)."""

    def __init__(self, sae, fast: bool = True):
        super().__init__()
        self.sae = sae
        self.fast = fast

    def forward(self, x):
        return self.sae.training_loss(x, fast=self.fast)
