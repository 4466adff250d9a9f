"""Training-step throughput: saekit's step vs a plain dense PyTorch BatchTopK step, in one run.

The plain step is the paper's code path written out: dense encode, flat top-k over the batch, a
dense [B, d_sae] code, dense decode, autograd through all of it, AuxK with a second dense decode.
Prints tokens/s for each, the ratio saekit/plain per architecture, peak memory, and the loss of both
after the same steps on the same data. Both run in fp32 (like for like); where saekit's default
precision is bf16 autocast (TrainConfig.autocast=None on a CPU with AVX-512 BF16 or a CUDA GPU) one
more row times BatchTopK at that default. Matryoshka's row pays for its prefixes' losses too (every
group's decode and MSE), which the plain step has not. Every method runs once per round, the rounds
interleaved (--rounds, 3 by default): the figures are medians over rounds, each ratio taken within
its round, with the range.

    python benchmarks/train_step.py            # CPU shape d=576, d_sae=4608, B=1024
    python benchmarks/train_step.py --gpu      # reference shape d=768, d_sae=24576, B=4096 on CUDA
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch

import saekit.sae
import saekit.train
from saekit.metrics.intervals import resample_weights
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer


class PlainBatchTopK(torch.nn.Module):
    """The baseline: BatchTopK as the paper's reference code does it, dense everywhere."""

    def __init__(self, d, f, k, k_aux=512, aux_alpha=1 / 32):
        super().__init__()
        W = torch.nn.init.kaiming_uniform_(torch.empty(d, f))
        self.W_enc = torch.nn.Parameter(W)
        self.W_dec = torch.nn.Parameter(W.t().clone() / W.t().norm(dim=-1, keepdim=True))
        self.b_enc = torch.nn.Parameter(torch.zeros(f))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k, self.k_aux, self.aux_alpha = k, k_aux, aux_alpha
        self.register_buffer("since", torch.zeros(f, dtype=torch.long))

    def loss(self, x, dead_tokens):
        mu, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
        acts = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = torch.topk(acts.flatten(), self.k * x.shape[0])
        z = (
            torch.zeros_like(acts.flatten())
            .scatter(-1, top.indices, top.values)
            .reshape(acts.shape)
        )
        x_hat = z @ self.W_dec + self.b_dec
        loss = (x_hat - x).pow(2).mean()
        dead = self.since >= dead_tokens
        if dead.any():
            k_aux = min(self.k_aux, int(dead.sum()))
            masked = torch.where(dead[None], acts, torch.zeros_like(acts))
            ta = torch.topk(masked, k_aux, dim=-1)
            z_aux = torch.zeros_like(acts).scatter(-1, ta.indices, ta.values)
            loss = loss + self.aux_alpha * (z_aux @ self.W_dec - (x - x_hat).detach()).pow(2).mean()
        with torch.no_grad():
            self.since += x.shape[0]
            self.since[(z > 0).any(0)] = 0
        return loss


def plain_step(model, opt, x, dead_tokens):
    loss = model.loss(x, dead_tokens)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        W = model.W_dec
        Wn = W / W.norm(dim=-1, keepdim=True)
        W.grad -= (W.grad * Wn).sum(-1, keepdim=True) * Wn
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        model.W_dec /= model.W_dec.norm(dim=-1, keepdim=True)
    return float(loss.detach())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # CPU: process peak RSS so far (monotone)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--d", type=int)
    ap.add_argument("--f", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of every method (medians reported)",
    )
    ap.add_argument(
        "--archs", nargs="+", default=["batchtopk", "topk", "jumprelu", "relu", "matryoshka"]
    )
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument(
        "--store",
        default=None,
        help="also train from this activation store (Trainer.fit), with and "
        "without read-ahead, and report the data-loading share",
    )
    ap.add_argument("--hook", default=None)
    ap.add_argument("--no-toy", action="store_true", help="skip the teaching notebook's toy shape")
    ap.add_argument(
        "--store-steps",
        type=int,
        default=200,
        help="training steps from the store (enough to pass the shuffle buffer's first fill)",
    )
    ap.add_argument(
        "--against",
        metavar="COMMIT",
        default=None,
        help="instead: this code's step against the step of saekit at COMMIT (a git revision), "
        "interleaved, per architecture at saekit's default precision, with the ratio's interval",
    )
    a = ap.parse_args()
    device = torch.device("cuda" if a.gpu else "cpu")
    d = a.d or (768 if a.gpu else 576)
    f = a.f or (24576 if a.gpu else 4608)
    B = a.batch or (4096 if a.gpu else 1024)
    steps = a.steps or (50 if a.gpu else 12)
    torch.manual_seed(0)
    data = (
        torch.randn(steps + 3, B, d, device=device) * torch.rand(steps + 3, B, 1, device=device) * 4
    )
    dead_tokens = 5 * B
    name = torch.cuda.get_device_name() if a.gpu else platform.processor() or platform.machine()
    print(
        f"device {device} ({name}, "
        f"{torch.get_num_threads()} threads), d={d}, d_sae={f}, batch={B}, k={a.k}, steps={steps}"
    )
    if a.against:
        results = run_against(a.against, data, f, a.archs, a.k, a.rounds, device)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(results, fh, indent=2)
        return

    def make_trainer(arch, autocast=False):
        cfg = SAEConfig(arch=arch, d_in=d, d_sae=f, k=a.k, target_l0=a.k, dead_tokens=dead_tokens)
        torch.manual_seed(0)
        return Trainer(
            [cfg],
            TrainConfig(
                total_tokens=(steps + 2) * B,
                batch_size=B,
                lr=3e-4,
                warmup_steps=0,
                decay_frac=0,
                b_dec_init="zeros",
                progress=False,
                device=str(device),
                autocast=autocast,
            ),
        )

    def run_plain():
        m = PlainBatchTopK(d, f, a.k).to(device)
        with torch.no_grad():  # start from exactly saekit's initial weights, so the losses compare
            sae = make_trainer("batchtopk").saes[0]
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(m, name).copy_(getattr(sae, name))
        opt = torch.optim.Adam(m.parameters(), lr=3e-4)
        for i in range(2):
            plain_step(m, opt, data[i], dead_tokens)
        sync(device)
        reset_peak(device)
        t = time.perf_counter()
        losses = [plain_step(m, opt, data[2 + i], dead_tokens) for i in range(steps)]
        sync(device)
        return steps * B / (time.perf_counter() - t), losses[-1], peak_mb(device)

    def run_saekit(arch, autocast=False):
        tr = make_trainer(arch, autocast)
        # b_dec stays zero (b_dec_init="zeros"); JumpReLU's thresholds start at its target L0
        tr.initialise(data[0])
        # a trained ReLU-L1's sparsity (L0 ~ k), which its penalty reaches only after many steps
        if arch == "relu":
            with torch.no_grad():
                sae = tr.saes[0]
                a_ = sae.pre_acts(sae.normalize_input(data[0])[0])
                sae.b_enc -= a_.flatten().topk(B * a.k).values.min()
        for i in range(2):
            tr.train_step(data[i])
        sync(device)
        reset_peak(device)
        t = time.perf_counter()
        for i in range(steps):
            stats = tr.train_step(data[2 + i])
        sync(device)
        return steps * B / (time.perf_counter() - t), stats[0]["loss"], peak_mb(device)

    import statistics

    results = {
        "device": str(device),
        "shape": dict(d=d, d_sae=f, batch=B, k=a.k),
        "steps": steps,
        "rounds": a.rounds,
    }
    runs = {
        "plain dense batchtopk": run_plain,
        **{f"saekit {arch}": lambda arch=arch: run_saekit(arch) for arch in a.archs},
    }
    # saekit's default: bf16
    if TrainConfig(batch_size=B).uses_autocast(device, SAEConfig(d_in=d, d_sae=f)):
        runs["saekit batchtopk bf16"] = lambda: run_saekit("batchtopk", None)
    got = {name: [] for name in runs}
    for _ in range(a.rounds):  # interleaved: machine drift hits every method alike
        for name, run in runs.items():
            got[name].append(run())
    base = [tps for tps, _, _ in got["plain dense batchtopk"]]
    for name, rows in got.items():
        tps = [r[0] for r in rows]
        ratio = [t / b for t, b in zip(tps, base)]
        key = "plain_batchtopk" if name.startswith("plain") else name.replace(" ", "_")
        results[key] = dict(
            tokens_per_s=statistics.median(tps),
            loss=rows[-1][1],
            peak_mb=max(r[2] for r in rows),
            ratio=statistics.median(ratio),
            ratio_range=[min(ratio), max(ratio)],
        )
        print(
            f"{name:<24} {statistics.median(tps):>12,.0f} tok/s  ratio "
            f"{statistics.median(ratio):.2f} "
            f"({min(ratio):.2f}-{max(ratio):.2f})  loss {rows[-1][1]:.5f}  peak "
            f"{max(r[2] for r in rows):,.0f} MB"
        )
    print(
        "ratio = saekit tokens/s / plain tokens/s in the same round: median (range) over "
        f"{a.rounds} interleaved "
        "rounds; tokens/s: median. plain and saekit batchtopk start from the same weights and "
        "see the same "
        f"batches, so their losses after the same steps compare directly. Every row fp32"
        + (
            ", but 'saekit batchtopk bf16': bf16 autocast, saekit's default on this device."
            if "saekit batchtopk bf16" in runs
            else "."
        )
    )
    if not a.gpu and not a.no_toy:
        results["toy"] = run_toy(device)
        # the smallest step: ~1 ms, where a step's fixed costs (theta, dead latents,
        # the checks) weigh most
        results["tiny"] = run_toy(
            device, d=16, f=128, B=64, k=4, steps=100, rounds=15, label="tiny size"
        )
    if a.store:
        results["store"] = run_store(a, device, a.store_steps)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=2)


def saekit_at(commit: str):
    """saekit as it was at `commit`, imported beside this one as the package `saekit_at_<commit>`
    (saekit imports itself only relatively, so a renamed copy is a separate package)."""
    import importlib
    import subprocess
    import sys
    import tarfile
    import tempfile
    from io import BytesIO
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(
        ["git", "rev-parse", "--short", commit],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    name = f"saekit_at_{sha}"
    where = Path(tempfile.mkdtemp(prefix="saekit-at-"))
    tar = subprocess.run(
        ["git", "archive", sha, "saekit"], cwd=root, capture_output=True, check=True
    ).stdout
    tarfile.open(fileobj=BytesIO(tar)).extractall(where)
    (where / "saekit").rename(where / name)
    sys.path.insert(0, str(where))
    return sha, importlib.import_module(f"{name}.sae"), importlib.import_module(f"{name}.train")


def run_against(
    commit: str, data: torch.Tensor, f: int, archs, k: int, rounds: int, device
) -> dict:
    """Each architecture's training step, this code against saekit at `commit`: the same config,
    start and batches, saekit's default precision, the two interleaved round by round (alternating
    which goes first; half the rounds with each trainer made first). The ratio
    old ms / new ms (> 1: this code is faster) with a 95% bootstrap interval over rounds, each
    round's pair kept."""
    sha, old_sae, old_train = saekit_at(commit)
    B, d = data.shape[1], data.shape[2]
    results = {"against": sha, "rounds": rounds}

    def trainer(sae_mod, train_mod, arch):
        torch.manual_seed(0)
        cfg = sae_mod.SAEConfig(arch=arch, d_in=d, d_sae=f, k=k, target_l0=k, dead_tokens=5 * B)
        tr = train_mod.Trainer(
            [cfg],
            train_mod.TrainConfig(
                total_tokens=10**9,
                batch_size=B,
                lr=3e-4,
                warmup_steps=0,
                progress=False,
                device=str(device),
            ),
        )
        tr.initialise(data[0])
        for i in range(2):
            tr.train_step(data[i])
        return tr

    steps = data.shape[0] - 3
    makers = {"old": (old_sae, old_train), "new": (saekit.sae, saekit.train)}
    for arch in archs:
        times = {"old": [], "new": []}
        # which trainer is made first shifts its speed by a few percent (memory placement): half the
        # rounds each way
        for first in ("old", "new"):
            order = (first, "new" if first == "old" else "old")
            pair = {name: trainer(*makers[name], arch) for name in order}
            for r in range((rounds + 1) // 2 if first == "old" else rounds // 2):
                for name in order if r % 2 == 0 else order[::-1]:
                    sync(device)
                    t = time.perf_counter()
                    for i in range(steps):
                        pair[name].train_step(data[2 + i])
                    sync(device)
                    times[name].append((time.perf_counter() - t) / steps)
            del pair
        w = resample_weights(rounds, seed=1)
        ci = np.quantile(
            (w @ np.array(times["old"])) / (w @ np.array(times["new"])), [0.025, 0.975]
        )
        ratio = sum(times["old"]) / sum(times["new"])
        per_round = [o / n for o, n in zip(times["old"], times["new"])]
        print(
            f"{arch:<12} old {np.median(times['old']) * 1e3:7.2f} ms  new "
            f"{np.median(times['new']) * 1e3:7.2f} ms"
            f"  old/new {ratio:.3f} [95% {ci[0]:.3f}, {ci[1]:.3f}] (rounds "
            f"{min(per_round):.3f}-{max(per_round):.3f})"
        )
        results[arch] = dict(
            old_ms=times["old"],
            new_ms=times["new"],
            ratio=ratio,
            interval=[float(ci[0]), float(ci[1])],
        )
    print(
        f"old = saekit at commit {sha}, new = this code; {rounds} interleaved rounds of {steps} "
        "steps, each round's two timings paired; > 1: this code's step is faster"
    )
    return results


def run_toy(device, d=48, f=192, B=4096, k=5, steps=4, rounds=5, label="toy size"):
    """A small shape (default: the teaching notebook's toy), where the sparse kernels do not pay:
    saekit must take its dense path and cost no more than the plain step; saekit at its default
    precision for that size. Median over interleaved rounds."""
    import statistics

    torch.manual_seed(0)
    x = torch.randn(4, B, d, device=device)
    plain = PlainBatchTopK(d, f, k).to(device)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    tr = Trainer(
        [SAEConfig(arch="batchtopk", d_in=d, d_sae=f, k=k, dead_tokens=5 * B)],
        TrainConfig(
            total_tokens=10**9,
            batch_size=B,
            lr=1e-3,
            warmup_steps=0,
            progress=False,
            device=str(device),
            b_dec_init="zeros",
        ),
    )
    runs = {
        "plain": lambda i: plain_step(plain, opt, x[i % 4], 5 * B),
        "saekit": lambda i: tr.train_step(x[i % 4]),
    }
    times = {n: [] for n in runs}
    for r in runs.values():
        r(0)
    for _ in range(rounds):
        for n, r in runs.items():
            t = time.perf_counter()
            for i in range(steps):
                r(i)
            times[n].append((time.perf_counter() - t) / steps)
    path = tr.saes[0].training_loss(x[0]).path
    precision = "bf16 autocast" if tr.autocasts[0] else "fp32"
    ms = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    per_round = [p / q for p, q in zip(times["plain"], times["saekit"])]  # each round's ratio
    # 95% interval of the ratio of total times: a bootstrap over the rounds, each round's
    # two times kept paired
    w = resample_weights(rounds, seed=1)
    ci = np.quantile(
        (w @ np.array(times["plain"])) / (w @ np.array(times["saekit"])), [0.025, 0.975]
    )
    print(
        f"{label:<24} d={d}, d_sae={f}, batch={B}, k={k}: plain {ms['plain']:.2f} ms, saekit "
        f"{ms['saekit']:.2f} ms "
        f"per step, ratio {ms['plain'] / ms['saekit']:.2f} [95% {ci[0]:.2f}-{ci[1]:.2f}] (rounds "
        f"{min(per_round):.2f}-{max(per_round):.2f}; saekit's {path} path at its default "
        f"{precision}; medians of "
        f"{rounds} interleaved rounds of {steps} steps)"
    )
    return dict(
        plain_ms=ms["plain"],
        saekit_ms=ms["saekit"],
        ratio=ms["plain"] / ms["saekit"],
        path=path,
        precision=precision,
        ratio_range=[min(per_round), max(per_round)],
        rounds=rounds,
        ratio_interval=[float(ci[0]), float(ci[1])],
        per_round=per_round,
    )


def run_store(a, device, steps):
    """Trainer.fit from a store: tokens/s and the share of the loop spent waiting for batches."""
    from saekit.activations import ActivationStore

    store = ActivationStore(a.store, a.hook)
    B = a.batch or (4096 if a.gpu else 1024)
    f = a.f or 8 * store.d_model
    out = {}
    for prefetch in (0, 2):
        cfg = SAEConfig(arch="batchtopk", d_in=store.d_model, d_sae=f, k=a.k)
        tc = TrainConfig(
            total_tokens=steps * B,
            batch_size=B,
            lr=3e-4,
            warmup_steps=0,
            progress=False,
            device=str(device),
            prefetch=prefetch,
            calibrate_batches=0,
            init_tokens=B,
        )
        res = Trainer([cfg], tc).fit(store, hook=a.hook)
        out[f"prefetch_{prefetch}"] = dict(
            tokens_per_s=res.tokens / res.seconds, data_share=res.data_share, steps=res.steps
        )
        print(
            f"{'store, read-ahead ' + str(prefetch):<24} {res.tokens / res.seconds:>12,.0f} tok/s "
            " data-loading "
            f"share {res.data_share:.1%} of the loop ({store.dtype} store, batch {B}, {res.steps} "
            "steps, shuffle "
            f"buffer {tc.buffer_rows:,} rows)"
        )
    return out


if __name__ == "__main__":
    main()
