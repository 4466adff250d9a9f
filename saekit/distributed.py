"""Training one SAE on several processes with torch.distributed (DDP).

Launch with `torchrun --nproc_per_node N -m saekit train ...` (or `saekit train --distributed` under
torchrun). Each rank reads its own part of the activation store and holds a replica of every SAE;
DDP all-reduces the gradients. Selection that couples the tokens of a batch is made over the
*global* batch:

- BatchTopK keeps the world*B*k largest pre-activations of all ranks together. Each rank sends its
  2*B*k+1 largest values (one all_gather); the cut is the (world*B*k)-th largest of the union, and
  it is exact when every rank's first unsent value lies below it (checked from the same gather).
  Otherwise the ranks gather their full top world*B*k (a second all_gather). Either way a rank keeps
  its entries at or above the cut: the same code as one process on the concatenated batch. Values
  equal to the cut on several ranks (frequent under bf16) are taken in rank order until world*B*k
  are kept (one all_gather of two counts).
- dead-latent counters see the global batch (fired latents all-reduced with MAX).
- JumpReLU's target-L0 penalty is a function of the global batch's L0; BatchTopK's final theta is
  the mean of the ranks' estimates.

Capture under torchrun (`torchrun --nproc_per_node N -m saekit capture ...`) needs only `on_rank0`
(rank 0 opens or starts the store and deals out the shards) and barriers; see
saekit.activations.capture.

Everything that talks to other ranks is in this module; the SAEs, the trainer and capture call it.

So a distributed step gives the weights of one process stepping on the concatenated batch (tested
with the gloo backend on CPU). Checkpoints and outputs are written once, by rank 0; every rank
resumes from them.
"""

from __future__ import annotations

import datetime
import inspect
import os
import sys

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


def init_from_env(device: str | None = None, timeout_s: float | None = None) -> torch.device:
    """Join the process group torchrun describes (env://): NCCL with one GPU per rank, else gloo on
    CPU.
    timeout_s: how long a collective waits for the slowest rank (None: torch's default, 30
    minutes for gloo)."""
    if not launched_by_torchrun():
        raise RuntimeError(
            "distributed training needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR); "
            "launch with: torchrun --nproc_per_node N -m saekit train ..."
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        kw = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kw)
    return torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")


def shutdown() -> None:
    """Leave the process group once every rank has got here: a rank that tore its gloo connections
    down while another was still writing its results aborted now and then at exit ("terminate called
    without an active exception", seen in a fresh-clone CI run of the 2-process tests). Not while an
    error propagates (callers call this in `finally`): the other ranks may be inside another
    collective, and torchrun stops them when this one exits."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1 and sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_rank0(fn):
    """fn() run on rank 0 alone; its result (or the error it raised) on every rank."""
    if not is_distributed():
        return fn()
    box = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # every rank raises it, so none waits forever for rank 0
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _gather_padded(vals: torch.Tensor, m: int) -> torch.Tensor:
    """[world, m] of every rank's m largest values (descending), padded with -inf."""
    top = vals.topk(min(m, vals.numel())).values if vals.numel() else vals
    buf = torch.full((m,), float("-inf"), dtype=torch.float32, device=vals.device)
    buf[: top.numel()] = top.float()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return torch.stack(out)


def global_batch_cut(local_top: torch.Tensor, n_global: int, share: int) -> tuple[float, bool]:
    """The n_global-th largest value over every rank's `local_top` (each rank's largest candidates).

    Round one gathers `share`+1 values per rank; the cut from the first `share` of each is exact
    when every rank's (share+1)-th value is below it. Returns (cut, exact); when not exact, call
    again with share = n_global on the full local top-n_global.
    """
    g = _gather_padded(local_top, share + 1)
    union = g[:, :share].reshape(-1)
    if union.numel() < n_global:
        return float("-inf"), False
    cut = union.topk(n_global).values[-1]
    return float(cut), bool((g[:, share] < cut).all())


def gather_objects(obj) -> list:
    """Every rank's `obj` (JSON-like), in rank order, on every rank."""
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


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


def global_batch_topk(
    a: torch.Tensor, k: int, hint: float, topk
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """BatchTopK's training selection over the global batch, kept apart from
    saekit.sae.selections.batch_topk (which calls it) because the ranks agree the cut between them:
    (flat indices, values, cut) of this rank's entries among the world*B*k largest pre-activations
    of all ranks (positive ones), where `topk(a, n, hint)` is the exact local top-n
    (saekit.sae.selections.top_n, passed in because this module imports nothing of the SAEs). The
    cut is the global n-th largest value, as one process on the concatenated batch would see it
    (None when nothing positive is kept anywhere)."""
    B = a.shape[0]
    n_global = B * world_size() * k
    share = min(2 * B * k, a.numel())
    vals, flat = topk(a, min(share + 1, a.numel()), hint)
    cut, exact = global_batch_cut(vals, n_global, share)
    # a rank holds more of the global top than its round-one share: gather its full top
    if not exact:
        full = min(n_global, a.numel())
        vals, flat = topk(a, full, hint)
        cut, _ = global_batch_cut(vals, n_global, full)
    keep = (vals >= cut) & (vals > 0)
    if cut > 0:
        keep = _ties_in_rank_order(vals, keep, cut, n_global)
    flat, vals = flat[keep], vals[keep]
    if cut > 0:
        return flat, vals, a.new_tensor(cut)
    m = vals.min() if vals.numel() else a.new_tensor(float("inf"))
    dist.all_reduce(m, op=dist.ReduceOp.MIN)
    return flat, vals, (m if torch.isfinite(m) else None)


def _ties_in_rank_order(
    vals: torch.Tensor, keep: torch.Tensor, cut: float, n_global: int
) -> torch.Tensor:
    """`keep` (entries at or above the cut) trimmed so that all ranks together keep exactly
    n_global: values equal to the cut on several ranks (bf16 pre-activations tie often: up to 2
    extra of 256 a step in the tests) are taken in rank order, and on a rank in the order of `vals`,
    until n_global are kept. One all_gather of two counts."""
    tie = keep & (vals == cut)
    counts = torch.stack([(keep & ~tie).sum(), tie.sum()]).to(torch.int64)
    every = [torch.empty_like(counts) for _ in range(world_size())]
    dist.all_gather(every, counts)
    c = torch.stack(every).tolist()
    me = rank()
    take = max(
        0, min(c[me][1], n_global - sum(above for above, _ in c) - sum(t for _, t in c[:me]))
    )
    if take < c[me][1]:
        keep = keep.clone()
        keep[tie.nonzero().squeeze(1)[take:]] = False
    return keep


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (a copy; the tensor itself is left alone)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t)
        t /= world_size()
    return t


def wrap_ddp(saes, device: torch.device, loss) -> list:
    """Each SAE's training loss `loss(sae, x, step, plan)` as a DistributedDataParallel module
    (gradients all-reduced over the ranks). The trainer's Step(distributed=True) makes
    batch-coupled terms (BatchTopK's selection, JumpReLU's L0 target) use the global batch."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # buffers (dead-latent counters, theta) are each rank's own: never broadcast on forward (the
    # keyword's name changed in torch 2.12; a GPU machine may carry an older torch
    # than the pinned one)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in params
        else {"broadcast_buffers": False}
    )
    return [DistributedDataParallel(LossModule(s, loss), device_ids=ids, **no_sync) for s in saes]


class LossModule(torch.nn.Module):
    """An SAE whose forward is its training loss, so DDP wraps it (DDP hooks in through forward)."""

    def __init__(self, sae, loss):
        super().__init__()
        self.sae = sae
        self.loss = loss

    def forward(self, x, step, plan):
        return self.loss(self.sae, x, step, plan)
