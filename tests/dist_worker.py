"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): a few Trainer steps
where each rank holds half of every global batch; rank 0 writes the resulting state for
comparison."""

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from saekit import distributed
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer

ARCHS = ["batchtopk", "matryoshka", "topk", "jumprelu"]


def global_batches(steps, B, d, seed=0):
    """The combined batches: the second half of each (rank 1's part) has 3x larger rows, so a global
    selection gives rank 1 more than half of the batch's latents."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, B, d, generator=g) + 0.3
    x[:, B // 2 :] *= 3
    return x


def setup(arch, world, steps, B, d=16, f=64, k=4, autocast=False):
    """fp32 by default: bf16 products round differently with the rows a rank holds, and the weights
    after 6 steps then differ by more than the comparison's tolerance (a check of the algorithm,
    not of bf16)."""
    cfg = SAEConfig(
        arch=arch,
        d_in=d,
        d_sae=f,
        k=k,
        normalize="none",
        target_l0=k if arch == "jumprelu" else None,
        dead_tokens=2 * B,
        k_aux=8,
    )
    tc = TrainConfig(
        total_tokens=steps * B,
        batch_size=B,
        lr=5e-3,
        warmup_steps=0,
        decay_frac=0,
        b_dec_init="mean",
        device="cpu",
        progress=False,
        autocast=autocast,
    )
    return Trainer([cfg], tc)


def main(out, steps=6, B=64):
    distributed.init_from_env("cpu")
    r, w = distributed.rank(), distributed.world_size()
    result = {}
    # "batchtopk_bf16": BatchTopK under bf16 autocast, whose pre-activations tie at
    # the cut across ranks
    for arch in [*ARCHS, "batchtopk_bf16"]:
        x = global_batches(steps, B, 16)
        tr = setup(arch.removesuffix("_bf16"), w, steps, B, autocast=arch.endswith("_bf16"))
        tr.initialise(x[0])
        local = B // w
        counts = []
        for s in range(steps):
            stats = tr.train_step(x[s, r * local : (r + 1) * local])
            counts.append(stats[0]["l0"] * local)
        c = torch.tensor(counts)
        all_c = [torch.zeros_like(c) for _ in range(w)]
        dist.all_gather(all_c, c)
        if r == 0:
            sae = tr.saes[0]
            save_file(
                {k: v.contiguous() for k, v in sae.state_dict().items()},
                f"{out}/{arch}.safetensors",
            )
            result[arch] = {
                "latents_per_rank": [a.tolist() for a in all_c],
                "tokens": tr.tokens,
                "step": tr.step,
            }
    if r == 0:
        with open(f"{out}/result.json", "w") as fh:
            json.dump(result, fh)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
