"""saekit against its peers, in one process on the same activations: SAELens's BatchTopK training
SAE, sparsify's TopK SparseCoder (its BatchTopK counterpart is per-token TopK), the plain dense
BatchTopK step (benchmarks/train_step.py) and saekit's fast BatchTopK step.

Every method sees the same batches in the same order (same d_sae, k, batch size and token budget),
with Adam at the same learning rate and no schedule; otherwise each keeps its own trainer's defaults
(initialisation, AuxK, decoder handling). Inputs are layer-normalised once (centred, unit std per
token) so that no method's own input scaling is measured. Afterwards every model is converted to a
saekit SAE through saekit's interop loaders and evaluated by saekit's metrics on held-out
activations: NMSE and mean L0 (BatchTopK models in threshold mode, each threshold computed the same
way from its final weights).

    python benchmarks/peers.py --store runs/smollm2_l15/store_train --hook resid_post.15   # CPU
    # GPU-sized random shape
    python benchmarks/peers.py --gpu
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import PlainBatchTopK, plain_step  # noqa: E402  (the same plain baseline as train_step.py)

from saekit.cli import enc_init_norm_arg  # noqa: E402
from saekit.interop import from_saelens_sae, from_sparsify_coder  # noqa: E402
from saekit.metrics import reconstruction_metrics  # noqa: E402
from saekit.sae import BatchTopKSAE, SAEConfig  # noqa: E402
from saekit.train import TrainConfig, Trainer  # noqa: E402


class PeakMemory:
    """Peak memory while a method runs: CUDA allocator peak, or on CPU the process RSS sampled every
    2 ms (minus the RSS at the start, so each method's own growth)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, self._rss())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
            self.mb = (self.peak - self.base) / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- the four methods: each returns (init -> state, step(state, x), to_saekit(state)) --------------


def saekit_method(
    d, f, k, lr, device, n_steps, B, enc_init_norm="paper", aux_alpha=1 / 32, step_graphs="off"
):
    def init(first):
        cfg = SAEConfig(
            arch="batchtopk",
            d_in=d,
            d_sae=f,
            k=k,
            normalize="none",
            dead_tokens=5 * B,
            enc_init_norm=enc_init_norm,
            aux_alpha=aux_alpha,
        )
        tr = Trainer(
            [cfg],
            TrainConfig(
                total_tokens=n_steps * B,
                batch_size=B,
                lr=lr,
                warmup_steps=0,
                decay_frac=0,
                progress=False,
                device=str(device),
                log_every=10**9,
                step_graphs=step_graphs,
            ),
        )
        tr.initialise(first)
        return tr

    return init, lambda tr, x: tr.train_step(x), lambda tr: tr.saes[0]


def plain_method(d, f, k, lr, device, n_steps, B):
    def init(first):
        torch.manual_seed(0)
        m = PlainBatchTopK(d, f, k).to(device)
        return m, torch.optim.Adam(m.parameters(), lr=lr)

    def to_saekit(state):
        m = state[0]
        sae = BatchTopKSAE(SAEConfig(arch="batchtopk", d_in=d, d_sae=f, k=k, normalize="none")).to(
            device
        )
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(sae, name).copy_(getattr(m, name))
        return sae

    # the plain step normalises per token itself; on layer-normalised inputs that is the identity
    return init, lambda s, x: plain_step(s[0], s[1], x, 5 * B), to_saekit


def saelens_method(d, f, k, lr, device, n_steps, B):
    from sae_lens import BatchTopKTrainingSAEConfig, TrainingSAE
    from sae_lens.saes.sae import TrainStepInput

    def init(first):
        torch.manual_seed(0)
        sae = TrainingSAE.from_dict(
            BatchTopKTrainingSAEConfig(d_in=d, d_sae=f, k=k, device=str(device)).to_dict()
        )
        sae.to(device)
        opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
        return {"sae": sae, "opt": opt, "since": torch.zeros(f, device=device), "step": 0}

    def step(s, x):  # sae_lens.training.sae_trainer.SAETrainer._train_step, without its logging
        sae = s["sae"]
        sae.train()
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=s["since"] > 1000,
                n_training_steps=s["step"],
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            s["since"] += 1
            s["since"][out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        s["opt"].step()
        s["opt"].zero_grad()
        s["step"] += 1

    return init, step, lambda s: from_saelens_sae(s["sae"])


def sparsify_method(d, f, k, lr, device, n_steps, B):
    from sparsify import SparseCoder, SparseCoderConfig

    def init(first):
        torch.manual_seed(0)
        coder = SparseCoder(d, SparseCoderConfig(num_latents=f, k=k), device=device)
        # sparsify's Trainer does this on its first step
        coder.b_dec.data = first.mean(0).to(coder.dtype)
        return coder, torch.optim.Adam(coder.parameters(), lr=lr)

    # sparsify.trainer.Trainer.fit's step for one SAE, loss_fn="fvu", auxk_alpha=0 (defaults)
    def step(s, x):
        coder, opt = s
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x)
        out.fvu.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return init, step, lambda s: from_sparsify_coder(s[0]).to(device)


def cpu_peak_mb(method: str, argv) -> float:
    """On CPU a process keeps freed memory for reuse, so methods run one after another in one
    process would hide each other's peaks: measure each in a fresh process of this script."""
    import subprocess

    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" in args:
        i = args.index("--json")
        del args[i : i + 2]
    r = subprocess.run(
        [sys.executable, __file__, *args, "--memory-of", method], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"memory run of {method} failed: {r.stderr[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


METHODS = {
    "plain": plain_method,
    "saekit": saekit_method,
    "saelens": saelens_method,
    "sparsify": sparsify_method,
}
LABELS = {
    "plain": "plain dense BatchTopK",
    "saekit": "saekit BatchTopK (fast)",
    "saelens": "SAELens BatchTopK",
    "sparsify": "sparsify TopK",
    "saekit_graphs": "saekit, step_graphs",
}


def load_data(a, device):
    if a.store:
        from saekit.activations import ActivationStore

        x = ActivationStore(a.store, a.hook).load(a.hook)
        src = f"store {a.store} ({a.hook}), {len(x):,} rows"
    else:
        g = torch.Generator().manual_seed(0)
        n = (a.steps + 8) * a.batch + a.eval_tokens
        x = torch.randn(n, a.d, generator=g) * torch.rand(n, 1, generator=g) * 4
        src = f"random N(0,1)*U(0,4) rows, {n:,}"
    x = x.float()
    # layer-normalised once, for all
    x = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)
    g = torch.Generator().manual_seed(1)
    x = x[torch.randperm(len(x), generator=g)]
    n_eval = min(a.eval_tokens, len(x) // 5)
    return x[n_eval:], x[:n_eval], src


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="activation store (saekit capture); default: random data")
    ap.add_argument("--hook", default=None)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--d", type=int, default=None, help="input width for random data")
    ap.add_argument("--f", type=int, default=None, help="dictionary size (default 8x d)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument(
        "--enc-init-norm",
        default="paper",
        type=enc_init_norm_arg,
        help="saekit's starting encoder norm (SAEConfig.enc_init_norm; default 'paper')",
    )
    ap.add_argument(
        "--aux-alpha",
        type=float,
        default=1 / 32,
        help="saekit's AuxK weight (default the paper's 1/32; 0: "
        "off, as sparsify's trainer by default)",
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--step-graphs",
        default="off",
        choices=["off", "cuda", "eager"],
        help="also run saekit with TrainConfig.step_graphs set to this (method saekit_graphs)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds of every method (median reported)",
    )
    ap.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the CPU peak-memory runs (one process per method)",
    )
    # child: one method's CPU peak memory
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.gpu else "cpu")
    methods = {
        **METHODS,
        "saekit": functools.partial(
            saekit_method, enc_init_norm=a.enc_init_norm, aux_alpha=a.aux_alpha
        ),
    }
    # the step recorded once and replayed (saekit.train.graphs), beside the eager one
    if a.step_graphs != "off":
        methods["saekit_graphs"] = functools.partial(methods["saekit"], step_graphs=a.step_graphs)
        a.methods = [*a.methods, "saekit_graphs"]
    a.d = a.d or (768 if a.gpu else 576)
    a.batch = a.batch or (4096 if a.gpu else 1024)
    a.steps = a.steps or (200 if a.gpu else 60)
    train_x, eval_x, src = load_data(a, device)
    d = train_x.shape[1]
    f = a.f or 8 * d
    B, n_steps = a.batch, a.steps
    if n_steps < 3:
        raise SystemExit("--steps must be at least 3 (two warm-up steps are not timed)")
    batches = [train_x[(i * B) % (len(train_x) - B + 1) :][:B].to(device) for i in range(n_steps)]
    epochs = n_steps * B / len(train_x)
    name = torch.cuda.get_device_name() if a.gpu else (platform.processor() or platform.machine())
    bf16 = TrainConfig(batch_size=B).uses_autocast(device, SAEConfig(d_in=d, d_sae=f))
    print(
        f"device {device} ({name}, {torch.get_num_threads()} threads); {src}; d={d}, "
        f"d_sae={f}, k={a.k}, batch={B}, steps={n_steps} ({n_steps * B:,} tokens, {epochs:.2f} "
        f"epochs), lr={a.lr}, held-out {len(eval_x):,} tokens; saekit "
        f"enc_init_norm={a.enc_init_norm}, aux_alpha={a.aux_alpha:g}, precision "
        f"{'bf16 autocast' if bf16 else 'fp32'} "
        "(its default at this size here; the peers run theirs)"
    )
    if a.memory_of:  # a fresh process runs only this method: its RSS growth is its own
        w_init, w_step, _ = methods[a.memory_of](d, 4 * a.k, a.k, a.lr, device, n_steps, 64)
        w_state = w_init(batches[0][:64])  # load the method's code paths at a tiny size first
        for x in batches[:3]:
            w_step(w_state, x[:64])
        del w_state
        init, step, _ = methods[a.memory_of](d, f, a.k, a.lr, device, n_steps, B)
        with PeakMemory(device) as mem:
            state = init(batches[0])
            for x in batches[: min(n_steps, 6)]:
                step(state, x)
        print(json.dumps({"peak_mb": mem.mb}))
        return None
    results = {
        "device": str(device),
        "device_name": name,
        "data": src,
        "shape": dict(d=d, d_sae=f, k=a.k, batch=B),
        "steps": n_steps,
        "saekit_enc_init_norm": a.enc_init_norm,
        "saekit_aux_alpha": a.aux_alpha,
    }
    reps = {m: [] for m in a.methods}
    # interleaved: every method once per round, the order rotated each round
    for rep in range(a.repeats):
        order = a.methods[rep % len(a.methods) :] + a.methods[: rep % len(a.methods)]
        for m in order:
            init, step, to_saekit = methods[m](d, f, a.k, a.lr, device, n_steps, B)
            with PeakMemory(device) as mem:
                state = init(batches[0])
                for x in batches[:2]:
                    step(state, x)
                sync(device)
                t = time.perf_counter()
                for x in batches[2:]:
                    step(state, x)
                sync(device)
                secs = time.perf_counter() - t
            reps[m].append((n_steps - 2) * B / secs)
            if rep:
                continue
            sae = to_saekit(state).to(device).eval()
            # one rule for every BatchTopK model: theta from its final weights
            if isinstance(sae, BatchTopKSAE):
                sae.calibrate_threshold(batches[-20:])
            ev = reconstruction_metrics(sae, eval_x.split(4096), device=device)
            peak = (
                mem.mb
                if device.type == "cuda"
                else (float("nan") if a.no_memory else cpu_peak_mb(m, argv))
            )
            results[m] = dict(nmse=ev["nmse"], l0=ev["l0"], peak_mb=peak)
            if m.startswith("saekit"):
                results[m]["dead_fraction_at_end"] = float(state.saes[0].dead_mask().float().mean())
    for m in a.methods:
        results[m].update(tokens_per_s=statistics.median(reps[m]), tokens_per_s_runs=reps[m])
    base = results.get("saekit")
    print(
        f"{'method':<26}{'tokens/s':>12}{'range':>20}{'saekit/this':>13}"
        f"{'NMSE':>9}{'L0':>8}{'peak MB':>10}"
    )
    for m in a.methods:
        r = results[m]
        # the ratio of each round's saekit run to this method's run in the same
        # round; median and range
        per_round = [sa / o for sa, o in zip(reps["saekit"], reps[m])] if base else [float("nan")]
        r["saekit_speedup"], r["saekit_speedup_range"] = (
            statistics.median(per_round),
            [min(per_round), max(per_round)],
        )
        rng = f"{min(reps[m]):,.0f}-{max(reps[m]):,.0f}"
        print(
            f"{LABELS[m]:<26}{r['tokens_per_s']:>12,.0f}{rng:>20}{r['saekit_speedup']:>12.2f}x{r['nmse']:>9.4f}"
            f"{r['l0']:>8.1f}{r['peak_mb']:>10,.0f}"
        )
    spans = {m: results[m]["saekit_speedup_range"] for m in a.methods if m != "saekit"}
    ranges = ", ".join(f"{LABELS[m]} {lo:.2f}-{hi:.2f}" for m, (lo, hi) in spans.items())
    print(
        f"tokens/s: median over {a.repeats} interleaved rounds (range: slowest-fastest round). "
        "saekit/this = median over rounds of saekit's tokens/s / this method's in the same "
        f"round (> 1: saekit is faster; range {ranges}). NMSE and L0 on held-out tokens by "
        "saekit's metrics after the same batches (first round). peak MB: growth over the run "
        + (
            "(CUDA allocator peak)."
            if a.gpu
            else "(RSS of a fresh process running 6 steps of only this method, sampled every 2 ms)."
        )
    )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
