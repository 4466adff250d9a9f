"""Where a training step's time goes: torch.profiler over saekit's BatchTopK step (the Trainer's, AuxK on) at the
CPU benchmark shape, grouped into the step's parts, as shares of the step. On a GPU (`--device cuda`) each part is
timed by CUDA events recorded around it in stream order (GPU time, no synchronisation inside the step).

    python benchmarks/profile_step.py [--store DIR --hook H] [--steps 20] [--dead 0.05]
    python benchmarks/profile_step.py --device cuda --d 768 --d-sae 24576 --batch 4096   # the paper's size

The data are a store's activations (or random rows); `--dead` marks that fraction of latents dead, as early in
training, so that AuxK runs (0: no dead latent, AuxK skipped). Writes the table to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer

PARTS = ["normalize", "encode (dense, no grad)", "select", "sparse encode backward", "decode", "AuxK",
         "loss + backward (rest)", "decoder constraint", "clip", "Adam", "dead latents + theta", "logging"]


class CudaParts:
    """record_function's stand-in on a GPU: CUDA events around each part, read once the step's work is done."""

    def __init__(self):
        self.events = []

    @contextlib.contextmanager
    def __call__(self, name):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events.append((name, start, end))

    def totals(self, n_steps: int) -> dict:
        torch.cuda.synchronize()
        out = defaultdict(float)
        for name, start, end in self.events:
            out[name] += start.elapsed_time(end) / n_steps
        return out


def instrumented_step(tr: Trainer, x: torch.Tensor, record_function=record_function):
    """Trainer.train_step's work for one SAE, each part under a profiler label (same calls, same order), at the
    trainer's precision (bf16 autocast where it is the default)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=tr.autocasts[0]):
        _instrumented_step(tr, x, record_function)


def _instrumented_step(tr: Trainer, x: torch.Tensor, record_function):
    from saekit.sae.kernels import CodeIndex, sparse_decode, sparse_encode, sparse_stats

    sae, opt = tr.saes[0], tr.opts[0]
    with record_function("normalize"):
        xs, _ = sae.normalize_input(x)
    with record_function("AuxK"):
        dead = sae._aux_dead()
    with record_function("encode (dense, no grad)"):
        xc, a = sae.centred_pre_acts(xs)
    with record_function("select"), torch.no_grad():
        sel = sae.train_select(a)
    with record_function("decode"):
        index = CodeIndex(sel.rows, sel.cols, xs.shape[0], sae.cfg.d_sae, rows_sorted=True)
        code = sparse_encode(xs, sae.W_enc, sae.b_enc, sae.b_dec, index, a, xc)
        decoded = sparse_decode(code, sae.W_dec)
        x_hat = decoded + sae.b_dec
        mse = (x_hat - xs).pow(2).mean()
    with record_function("AuxK"):
        aux = 0 if dead is None else (sae.aux_reconstruction(xc, dead, (index, code.vals, decoded))
                                      - (xs - x_hat).detach()).pow(2).mean()
    with record_function("loss + backward (rest)"):
        opt.zero_grad(set_to_none=True)
        (mse + sae.cfg.aux_alpha * aux).backward()
        fired = sparse_stats(sel.rows, sel.cols, x.shape[0], sae.cfg.d_sae, index=index)[0]
        since, n_dead = sae.next_dead_counters(fired, x.shape[0])
        exact = sel.exact if sel.exact is not None else torch.ones((), dtype=torch.bool, device=x.device)
        # the trainer's one read-back (with the loss's check)
        _, n_dead, cut = torch.stack([exact.double(), n_dead.double(), sel.cut.double()]).tolist()
    with record_function("decoder constraint"):
        sae.remove_parallel_grad()
    with record_function("clip"):
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    with record_function("Adam"):
        opt.step()
        sae.normalize_decoder()
    with record_function("dead latents + theta"), torch.no_grad():
        sae.set_dead_counters(since, int(n_dead))
        sae.after_step(SimpleNamespace(cut=sel.cut, cut_value=cut))  # theta and the next step's hint: this cut


def host_or_device(tr: Trainer, batches, label: str = "Trainer.train_step"):
    """On a GPU: is the real Trainer step bound by the device or by the host? Its wall time against the time the
    GPU spends in kernels, the kernel launches per step, and the operators by GPU time."""
    import time

    for x in batches[:3]:
        tr.train_step(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for x in batches:
        tr.train_step(x)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / len(batches) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for x in batches:
            tr.train_step(x)
        torch.cuda.synchronize()
    avg = prof.key_averages()
    # the device's own events (kernels, copies, memsets): a replayed CUDA graph's kernels have no operator above them
    busy = sum(ev.self_device_time_total for ev in avg if ev.device_type == torch.autograd.DeviceType.CUDA)
    busy = busy / 1e3 / len(batches)
    launches = sum(ev.count for ev in avg if "LaunchKernel" in ev.key) / len(batches)
    syncs = sum(ev.count for ev in avg if ev.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")) / len(batches)
    print(f"\n{label}: {wall:.2f} ms wall per step, GPU busy {busy:.2f} ms ({busy / wall:.0%}), "
          f"{launches:.0f} kernel launches and {syncs:.1f} host syncs per step")
    print(avg.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=50))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--hook", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dead", type=float, default=0.05, help="fraction of latents marked dead (AuxK runs)")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--d", type=int, default=576, help="input width of the random rows (without --store)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tf32", action="store_true", help="TF32 matrix products on a GPU")
    ap.add_argument("--step-graphs", action="store_true",
                    help="on a GPU, also the Trainer with step_graphs='cuda' (the step recorded once and replayed)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    if a.store:
        from saekit.activations import ActivationStore

        x_all = ActivationStore(a.store, a.hook).rows(0, (a.steps + 2) * a.batch, a.hook).float()
    else:
        x_all = torch.randn((a.steps + 2) * a.batch, a.d)
    d = x_all.shape[1]
    batches = x_all.to(dev).split(a.batch)
    tr = Trainer([SAEConfig(arch="batchtopk", d_in=d, d_sae=a.d_sae, k=32, dead_tokens=5 * a.batch)],
                 TrainConfig(total_tokens=10**9, batch_size=a.batch, warmup_steps=0, progress=False, device=str(dev)))
    tr.initialise(torch.cat(batches[:2]))
    sae = tr.saes[0]
    n_dead = int(a.dead * a.d_sae)
    for i in range(2):
        tr.train_step(batches[i])
    sae.tokens_since_fired[:n_dead] = 10 * sae.cfg.dead_tokens  # dead, as early in training
    hold = sae.tokens_since_fired.clone(), int(sae.dead_mask().sum())
    if dev.type == "cuda":
        parts = CudaParts()
        for x in batches[2:a.steps + 2]:
            with parts("step"):
                instrumented_step(tr, x, parts)
            sae.set_dead_counters(*hold)
        totals, prof = parts.totals(a.steps), None
    else:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in batches[2:a.steps + 2]:
                with record_function("step"):
                    instrumented_step(tr, x)
                sae.set_dead_counters(*hold)  # the same dead set every step, its number known
        totals = defaultdict(float)
        for ev in prof.key_averages():
            if ev.key in PARTS or ev.key == "step":
                totals[ev.key] = ev.cpu_time_total / 1e3 / a.steps
    # autograd runs a part's backward outside its label: it lands in "loss + backward (rest)"
    step = totals["step"]
    print(f"saekit BatchTopK step, d={d}, d_sae={a.d_sae}, batch {a.batch}, k=32, {n_dead} dead latents "
          f"({a.dead:.0%}), {'bf16 autocast' if tr.autocasts[0] else 'fp32'}, {torch.cuda.get_device_name() if prof is None else f'{torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}; mean over {a.steps} steps")
    print(f"{'part':<28}{'ms/step':>9}{'share':>8}")
    for p in PARTS:
        if p in totals:
            print(f"{p:<28}{totals[p]:>9.2f}{totals[p] / step:>8.1%}")
    print(f"{'step (all)':<28}{step:>9.2f}{1:>8.0%}")
    if prof is None:
        host_or_device(tr, batches[2:a.steps + 2])
        if a.step_graphs:
            torch.manual_seed(0)
            tr = Trainer([SAEConfig(arch="batchtopk", d_in=d, d_sae=a.d_sae, k=32, dead_tokens=5 * a.batch)],
                         TrainConfig(total_tokens=10**9, batch_size=a.batch, warmup_steps=0, progress=False,
                                     device=str(dev), step_graphs="cuda"))
            tr.initialise(torch.cat(batches[:2]))
            for x in batches[:8]:  # past the warm-up runs and the first recordings
                tr.train_step(x)
            host_or_device(tr, batches[2:a.steps + 2], "Trainer.train_step, step_graphs='cuda'")
        return
    print("\nTop operators (self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
