"""The first GPU run, as one command: `bash benchmarks/gpu.sh` (or `python -m benchmarks.gpu`) on a
machine with one CUDA GPU. About 5 minutes on one H100. It checks the CUDA paths that no CPU run
can, times the training step at the paper's size, runs the peers and the capture on the GPU, writes
benchmarks/results/gpu-DATE.json and gpu-DATE.md, prints the table last, and exits non-zero if any
check failed.

1. correctness: for every architecture, the fast path against the reference path (loss and every
   gradient) in fp32 and under bf16 autocast; BatchTopK's theta calibration (exact L0 on the
   calibration batches); the DDP path (saekit.distributed.wrap_ddp) with NCCL on one rank, against
   the same steps without DDP.
2. the training step at the paper's size (d=768, d_sae=24,576, batch 4,096, k=32): the plain dense
   fp32 step, saekit fp32 / tf32 / bf16 autocast, each also with its step recorded as CUDA graphs
   (step_graphs="cuda", checked against the eager step in 1.), JumpReLU fp32 (target L0 = k) with
   and without graphs, and torch.compile of the plain step; median of interleaved repetitions.
3. the peers (benchmarks/peers.py --gpu): tokens/s and held-out NMSE of saekit, SAELens, sparsify,
   plain.
4. capture tokens/s of the embedded model on the GPU (benchmarks/capture.py's measure).
5. training straight from the model against capture-then-train and SAELens (benchmarks/stream.py).

    python -m benchmarks.gpu [--out benchmarks/results] [--dry]

--dry runs the same script on the CPU with tiny shapes (gloo instead of NCCL, no tf32): the test
suite does, so the script cannot rot before a GPU is there to run it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from train_step import PlainBatchTopK, plain_step  # noqa: E402

from saekit import distributed as D  # noqa: E402
from saekit.sae import ARCHS, SAEConfig, Step, make_sae  # noqa: E402
from saekit.sae.fast import Plan, training_loss  # noqa: E402

PAPER = dict(d=768, f=24_576, B=4096, k=32)
DRY = dict(d=32, f=256, B=256, k=8)


class Run:
    """Rows of the final table, and every failure (the run fails at the end if there is one)."""

    def __init__(self):
        self.rows, self.failures, self.data = [], [], {}

    def row(self, section, what, value, note=""):
        self.rows.append({"section": section, "what": what, "value": value, "note": note})
        print(f"  {section:<12} {what:<46} {value:<22} {note}", flush=True)

    def check(self, section, what, ok: bool, value: str, note=""):
        self.row(section, what, value, ("ok " if ok else "FAILED ") + note)
        if not ok:
            self.failures.append(f"{section}: {what}: {value} {note}")

    def guard(self, section, fn, *args):
        """Run one section; an exception is a failure with its traceback, and the other sections
        still run."""
        try:
            fn(self, *args)
        except Exception as e:  # noqa: BLE001 - every error is reported and fails the run
            traceback.print_exc()
            self.failures.append(f"{section}: {type(e).__name__}: {e}")
            self.row(section, "error", type(e).__name__, str(e)[:120])


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def correctness(run: Run, dev: torch.device, dry: bool):
    import saekit.sae.fast.paths as base

    d, f, B = (16, 64, 64) if dry else (128, 2048, 1024)
    # the sparse path whatever the size and density, so that every architecture's
    # kernels are checked
    saved, (base.SPARSE_MIN_LATENTS, base.SPARSE_MAX_DENSITY) = (
        (base.SPARSE_MIN_LATENTS, base.SPARSE_MAX_DENSITY),
        (0, 1.0),
    )
    try:
        fast_vs_reference(run, dev, d, f, B)
        sync_free_vs_exact(run, dev, d, f, B)
        graphs_vs_eager(run, dev, d, f, B)
    finally:
        base.SPARSE_MIN_LATENTS, base.SPARSE_MAX_DENSITY = saved
    calibration(run, dev, d, f, B)
    ddp(run, dev, d, f, B)


def fast_vs_reference(run: Run, dev: torch.device, d: int, f: int, B: int):
    for arch in ARCHS:
        for amp in (False, True):
            torch.manual_seed(0)
            cfg = SAEConfig(arch=arch, d_in=d, d_sae=f, k=8, target_l0=8, dead_tokens=B, k_aux=32)
            ref, fast = make_sae(cfg).to(dev), make_sae(cfg).to(dev)
            x = torch.randn(4 * B, d, device=dev)
            with torch.no_grad():
                ref.init_from_data(ref.normalize_input(x)[0])
                ref.tokens_since_fired[: f // 8] = 10 * B  # some dead latents: AuxK runs
                if arch == "relu":
                    ref.b_enc.fill_(-0.5)  # a sparse code, as the L1 penalty makes it
            fast.load_state_dict(ref.state_dict())
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                o1, o2 = ref.training_loss(x[:B], fast=False), fast.training_loss(x[:B], fast=True)
            o1.loss.backward()
            o2.loss.backward()
            worst = max(
                _rel(p2.grad.float(), p1.grad.float())
                for p1, p2 in zip(ref.parameters(), fast.parameters())
                if p1.grad is not None
            )
            loss_rel = abs(float(o1.loss.detach()) - float(o2.loss.detach())) / abs(
                float(o1.loss.detach())
            )
            tol = 2e-2 if amp else 1e-4
            run.check(
                "correctness",
                f"{arch} fast vs reference ({'bf16 autocast' if amp else 'fp32'})",
                loss_rel < tol and worst < tol * 5 and o2.path == "sparse",
                f"loss {loss_rel:.1e}, grads {worst:.1e}",
                f"path {o2.path}; relative errors, tolerance {tol:g} / {tol * 5:g}",
            )


def sync_free_vs_exact(run: Run, dev: torch.device, d: int, f: int, B: int):
    """The selections without read-backs (the default on a GPU) train as the exact ones: for
    BatchTopK (its top B*k above a hint), JumpReLU and ReLU-L1 (their entries in slots sized by the
    previous density), two Trainers from the same start on the same batches, 8 steps (BatchTopK with
    dead latents, AuxK from the read-back count); every selection after the first step flagged
    exact, or redone. In fp32: bf16 pre-activations tie at the cut, and two correct selections
    may keep different tied entries."""
    import saekit.sae.fast.paths as paths

    xs = [torch.randn(B, d, device=dev) * torch.rand(B, 1, device=dev) * 4 for _ in range(8)]
    for arch, owner, method in (
        ("batchtopk", paths, "top_entries"),
        ("jumprelu", paths, "entries"),
        ("relu", paths, "entries"),
    ):
        flags, original = [], getattr(owner, method)

        def spy(*args, original=original, flags=flags):
            got = original(*args)
            # top_entries: (selection, exact); entries: Entries with its exact flag
            exact = got.exact if hasattr(got, "exact") else got[1]
            if exact is not None:  # made without read-backs (the exact paths' have no flag)
                flags.append(bool(exact))
            return got

        setattr(owner, method, spy)
        try:
            trainers = {
                free: _trained(arch, xs, d, f, B, dev, free, warmup_steps=0, autocast=False)
                for free in (True, False)
            }
        finally:
            setattr(owner, method, original)
        worst = _worst(trainers[True], trainers[False])
        run.check(
            "correctness",
            f"{arch} selection without read-backs vs exact, 8 steps",
            worst < 1e-4 and len(flags) >= 7,
            f"weights {worst:.1e}",
            f"{sum(flags)} of {len(flags)} selections without read-backs exact, the rest redone",
        )


def _trained(
    arch: str, xs, d: int, f: int, B: int, dev: torch.device, sync_free: bool, **train_fields
):
    """A Trainer for one SAE of `arch` (k / target L0 8), seeded, initialised on the first two
    batches and stepped over all of xs; train_fields go to its TrainConfig."""
    from saekit.train import TrainConfig, Trainer

    torch.manual_seed(0)
    tr = Trainer(
        [SAEConfig(arch=arch, d_in=d, d_sae=f, k=8, target_l0=8, dead_tokens=2 * B)],
        TrainConfig(
            total_tokens=10**9,
            batch_size=B,
            progress=False,
            device=str(dev),
            sync_free=sync_free,
            **train_fields,
        ),
    )
    tr.initialise(torch.cat(xs[:2]))
    for x in xs:
        tr.train_step(x)
    return tr


def _worst(a, b) -> float:
    """The largest relative difference between two Trainers' SAE parameters."""
    return max(
        _rel(p.detach(), q.detach()) for p, q in zip(a.saes[0].parameters(), b.saes[0].parameters())
    )


def graphs_vs_eager(run: Run, dev: torch.device, d: int, f: int, B: int):
    """The step recorded as CUDA graphs (step_graphs="cuda"; --dry: the same phases unrecorded)
    trains as the eager step, for BatchTopK (AuxK's slots change: dead latents appear) and JumpReLU
    (its entry slots follow its density): two Trainers from the same start on the same batches (the
    selections without read-backs in both), 16 steps with warmup, so that several phases are
    recorded and replayed."""
    xs = [torch.randn(B, d, device=dev) * torch.rand(B, 1, device=dev) * 4 for _ in range(16)]
    mode = "cuda" if dev.type == "cuda" else "eager"
    for arch in ("batchtopk", "jumprelu"):
        trainers = {
            graphs: _trained(arch, xs, d, f, B, dev, True, warmup_steps=4, step_graphs=graphs)
            for graphs in (mode, "off")
        }
        rec = trainers[mode].graphed[0]
        worst = _worst(trainers[mode], trainers["off"])
        recorded = sorted(str(k) for k in rec.graphs) if rec is not None else []
        ok = worst < 1e-4 and rec is not None and (mode == "eager" or len(recorded) >= 2)
        run.check(
            "correctness",
            f"{arch} step_graphs={mode} vs eager step, 16 steps",
            ok,
            f"weights {worst:.1e}",
            f"recorded phases: {', '.join(recorded) or 'none (unrecorded mode)'}",
        )


def calibration(run: Run, dev: torch.device, d: int, f: int, B: int):
    from saekit.calibrate import threshold_for_l0

    sae = make_sae(SAEConfig(arch="batchtopk", d_in=d, d_sae=f, k=8)).to(dev).eval()
    batches = [torch.randn(B, d, device=dev) for _ in range(4)]
    theta = threshold_for_l0(sae, batches, 8.0, 4 * B)
    sae.set_threshold(theta)
    l0 = sum(int((sae.encode(b) != 0).sum()) for b in batches) / (4 * B)
    run.check(
        "correctness",
        "theta calibrated to L0 8 on its batches",
        abs(l0 - 8) <= 1 / B,
        f"L0 {l0:.4f}",
    )


def ddp(run: Run, dev: torch.device, d: int, f: int, B: int):
    """The DDP wrapper with NCCL (gloo on CPU) on one rank: the same weights as the same steps
    without it."""
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    with tempfile.NamedTemporaryFile() as fh:
        dist.init_process_group(backend, init_method=f"file://{fh.name}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            cfg = SAEConfig(arch="batchtopk", d_in=d, d_sae=f, k=8)
            plain, wrapped = make_sae(cfg).to(dev), make_sae(cfg).to(dev)
            wrapped.load_state_dict(plain.state_dict())
            (module,) = D.wrap_ddp([wrapped], dev, training_loss)
            opts = [torch.optim.Adam(s.parameters(), lr=1e-3) for s in (plain, wrapped)]
            for _ in range(3):
                x = torch.randn(B, d, device=dev)
                for loss_of, opt in (
                    (lambda x: plain.training_loss(x).loss, opts[0]),
                    (lambda x: module(x, Step(distributed=True), Plan()).loss, opts[1]),
                ):
                    opt.zero_grad()
                    loss_of(x).backward()
                    opt.step()
            worst = max(
                _rel(a.detach(), b.detach())
                for a, b in zip(wrapped.parameters(), plain.parameters())
            )
            run.check(
                "correctness",
                f"DDP ({backend}, 1 rank) vs no DDP, 3 steps",
                worst < 1e-5,
                f"weights {worst:.1e}",
            )
        finally:
            dist.destroy_process_group()


def sync_sites(caught) -> list[str]:
    """Where each synchronizing CUDA operation was called from
    (torch.cuda.set_sync_debug_mode("warn") warns at the Python line that called it): the
    project's own file and line, else the first line of the message."""
    sites = []
    for w in caught:
        text = str(w.message)
        if "synchroniz" not in text:
            continue
        _, inside, rest = Path(w.filename).as_posix().rpartition("/saekit/")
        sites.append(
            f"{rest}:{w.lineno}"
            if inside
            else f"{Path(w.filename).name}:{w.lineno} ({text.splitlines()[0][:40]})"
        )
    return sites


def train_step(run: Run, dev: torch.device, dry: bool):
    s = DRY if dry else PAPER
    d, f, B, k = s["d"], s["f"], s["B"], s["k"]
    steps, rounds, warm = (2, 2, 2) if dry else (15, 3, 12)
    x = [torch.randn(B, d, device=dev) * torch.rand(B, 1, device=dev) * 4 for _ in range(4)]

    def plain_runner(compile_it=False):
        torch.manual_seed(0)
        m = PlainBatchTopK(d, f, k).to(dev)
        if compile_it:
            m.loss = torch.compile(m.loss)
        opt = torch.optim.Adam(m.parameters(), lr=3e-4)
        return lambda i: plain_step(m, opt, x[i % 4], 5 * B)

    def saekit_runner(amp, sync_free=None, graphs="off", arch="batchtopk"):
        from saekit.train import TrainConfig, Trainer

        # JumpReLU: its target L0 is k, its thresholds start where the batch has that L0
        torch.manual_seed(0)
        tr = Trainer(
            [SAEConfig(arch=arch, d_in=d, d_sae=f, k=k, target_l0=k, dead_tokens=5 * B)],
            TrainConfig(
                total_tokens=10**9,
                batch_size=B,
                lr=3e-4,
                warmup_steps=0,
                progress=False,
                device=str(dev),
                autocast=amp,
                b_dec_init="zeros",
                step_graphs=graphs,
                # None: the default (without read-backs on a GPU)
                sync_free=sync_free,
            ),
        )
        if arch == "jumprelu":
            tr.initialise(x[0])
        return lambda i: tr.train_step(x[i % 4])

    graphs_mode = "cuda" if dev.type == "cuda" else "eager"
    variants = {
        "plain fp32": (plain_runner, (), False),
        "saekit fp32": (saekit_runner, (False,), False),
        "saekit bf16 autocast": (saekit_runner, (True,), False),
        # the step recorded once and replayed (saekit.train.graphs); --dry: its phases unrecorded
        "saekit fp32, step_graphs": (saekit_runner, (False, None, graphs_mode), False),
        "saekit JumpReLU fp32": (saekit_runner, (False, None, "off", "jumprelu"), False),
        "saekit JumpReLU fp32, step_graphs": (
            saekit_runner,
            (False, None, graphs_mode, "jumprelu"),
            False,
        ),
    }
    if dev.type == "cuda":
        variants.update(
            {
                "plain tf32": (plain_runner, (), True),
                "saekit tf32": (saekit_runner, (False,), True),
                # the selection with read-backs, as before 2026-11-27: what the one
                # read-back a step buys
                "saekit tf32, selection with read-backs": (saekit_runner, (False, False), True),
                "saekit tf32, step_graphs": (saekit_runner, (False, None, "cuda"), True),
                "saekit bf16 autocast, step_graphs": (saekit_runner, (True, None, "cuda"), False),
                "plain torch.compile": (plain_runner, (True,), False),
            }
        )
    runners, times = {}, {name: [] for name in variants}
    for name, (make, args, tf32) in variants.items():
        try:
            runners[name] = make(*args)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for i in range(warm):
                # warm-up (and compile; step_graphs: most recordings, dead latents appear at 5)
                runners[name](i)
        except Exception as e:  # noqa: BLE001 - compile is optional: report, do not fail
            if "compile" not in name:
                raise
            run.row("train step", name, "n/a", f"{type(e).__name__}: {str(e)[:80]}")
    for _ in range(rounds):  # interleaved: each variant once per round
        for name, step in runners.items():
            torch.backends.cuda.matmul.allow_tf32 = variants[name][2]
            sync(dev)
            t = time.perf_counter()
            for i in range(steps):
                step(i)
            sync(dev)
            times[name].append((time.perf_counter() - t) / steps * 1e3)
    torch.backends.cuda.matmul.allow_tf32 = False
    # each read-back stalls the host until the device is done: count them in one step
    if dev.type == "cuda":
        import warnings

        for name in ("saekit fp32", "saekit fp32, step_graphs"):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    runners[name](0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            syncs = sync_sites(caught)
            run.data.setdefault("host_syncs_per_step", {})[name] = syncs
            run.row(
                "train step",
                f"{name}: host syncs in one step",
                str(len(syncs)),
                "at "
                + "; ".join(
                    f"{site} x{n}" if n > 1 else site for site, n in Counter(syncs).items()
                )[:300],
            )
    base = statistics.median(times["plain fp32"])
    run.data["train_step"] = {"shape": s, "ms_per_step": times}
    for name in runners:
        ms = statistics.median(times[name])
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        run.row(
            "train step",
            f"{name} (d={d}, d_sae={f:,}, B={B:,}, k={k})",
            f"{ms:.2f} ms  {base / ms:.2f}x",
            f"x = plain fp32 ms / this; range {spread} ms over {rounds} rounds of {steps} steps",
        )


def peer_run(run: Run, dev: torch.device, dry: bool):
    args = (
        [
            "--d",
            "32",
            "--f",
            "128",
            "--batch",
            "128",
            "--steps",
            "4",
            "--eval-tokens",
            "512",
            "--k",
            "4",
            "--no-memory",
            "--repeats",
            "1",
            "--step-graphs",
            "eager",
        ]
        if dry
        else ["--gpu", "--steps", "200", "--step-graphs", "cuda"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = peers.main([*args, "--json", os.path.join(tmp, "p.json")])
    run.data["peers"] = res
    for m in [*peers.METHODS, "saekit_graphs"]:
        r = res[m]
        run.row(
            "peers",
            peers.LABELS[m],
            f"{r['tokens_per_s']:,.0f} tok/s",
            f"saekit/this {r['saekit_speedup']:.2f}x, "
            f"held-out NMSE {r['nmse']:.4f}, L0 {r['l0']:.1f}",
        )


def capture_run(run: Run, dev: torch.device, dry: bool):
    from saekit.activations import capture_throughput
    from saekit.data import packed_corpus
    from saekit.models import load_model

    model = load_model(device=str(dev))
    packed = packed_corpus(model.tokenizer, seq_len=128, max_tokens=64 * 128)
    n = 2 if dry else 20
    tps = capture_throughput(
        model, packed, "resid_post.15", batch_size=8 if dry else 64, n_batches_=n
    )
    full = capture_throughput(
        model, packed, "resid_post.15", batch_size=8 if dry else 64, n_batches_=n, stop=False
    )
    run.data["capture"] = {"tokens_per_s": tps, "full_forward_tokens_per_s": full}
    run.row(
        "capture",
        "embedded model, resid_post.15",
        f"{tps:,.0f} tok/s",
        f"{tps / full:.2f}x the tokens/s of a full forward",
    )


def stream_run(run: Run, dev: torch.device, dry: bool):
    """Training straight from the model against capture-then-train and SAELens's on-the-fly trainer
    (benchmarks/stream.py) at equal tokens on this device."""
    import tempfile

    import stream

    from saekit.models import load_model

    model = load_model(device=str(dev))
    tokens, batch = (512, 128) if dry else (262_144, 4096)
    with tempfile.TemporaryDirectory() as tmp:
        a, saes_a = stream.streamed(model, ["resid_post.15"], tokens, batch, Path(tmp) / "a",
                                    window=2 if dry else None)  # fmt: skip
        b, saes_b = stream.captured(model, "resid_post.15", tokens, batch, Path(tmp) / "b")
        c, saes_c = stream.saelens(model, "resid_post.15", tokens, batch, Path(tmp) / "c",
                                   buffer=2 if dry else 20)  # fmt: skip
        nmse = [
            stream.held_out(model, s[0], "resid_post.15", Path(tmp))[0]
            for s in (saes_a, saes_b, saes_c)
        ]
    run.data["stream"] = {"streaming": a, "capture_then_train": b, "saelens": c, "nmse": nmse}
    run.row(
        "stream",
        f"training from the model, {tokens:,} tokens, resid_post.15",
        f"{a['tokens_per_s']:,.0f} tok/s",
        f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x capture-then-train "
        f"({b['tokens_per_s']:,.0f} tok/s); forward {a['forward_share']:.0%} of the stream; "
        f"{a['tokens_per_s'] / c['tokens_per_s']:.2f}x SAELens on the fly "
        f"({c['tokens_per_s']:,.0f} tok/s); held-out NMSE {nmse[0]:.4f}, capture-then-train "
        f"{nmse[1]:.4f}, SAELens {nmse[2]:.4f}",
    )


SECTIONS = {
    "correctness": correctness,
    "train step": train_step,
    "peers": peer_run,
    "capture": capture_run,
    "stream": stream_run,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", default=str(HERE / "results"), help="folder for gpu-DATE.json and gpu-DATE.md"
    )
    ap.add_argument(
        "--dry", action="store_true", help="CPU, tiny shapes: check that the script runs"
    )
    a = ap.parse_args(argv)
    if not a.dry and not torch.cuda.is_available():
        print(
            "no CUDA device here: run on a machine with a GPU, or "
            "pass --dry to check the script on the CPU"
        )
        return 2
    dev = torch.device("cpu" if a.dry else "cuda")
    t0 = time.perf_counter()
    name = "CPU (dry run)" if a.dry else torch.cuda.get_device_name()
    print(f"saekit GPU run on {name}, torch {torch.__version__}")
    run = Run()
    for section, fn in SECTIONS.items():
        print(f"\n[{section}]", flush=True)
        run.guard(section, fn, dev, a.dry)
    stamp = datetime.date.today().isoformat() + ("-dry" if a.dry else "")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = [
        f"# saekit on {name} ({stamp}, torch "
        f"{torch.__version__}, {time.perf_counter() - t0:.0f} s)",
        "",
        "| section | what | value | note |",
        "|---|---|---|---|",
    ]
    table += [f"| {r['section']} | {r['what']} | {r['value']} | {r['note']} |" for r in run.rows]
    if run.failures:
        table += ["", "FAILED:"] + [f"- {x}" for x in run.failures]
    (out / f"gpu-{stamp}.md").write_text("\n".join(table) + "\n")
    (out / f"gpu-{stamp}.json").write_text(
        json.dumps(
            {"device": name, "rows": run.rows, "failures": run.failures, "data": run.data},
            indent=2,
            default=str,
        )
    )
    print("\n" + "\n".join(table))
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
