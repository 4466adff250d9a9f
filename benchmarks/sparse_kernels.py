"""The sparse products of saekit's fast path, each against the library kernels that could do it instead, at one
shape: which kernel a device should use. saekit does all three with torch's embedding_bag (saekit.sae.kernels).

    python benchmarks/sparse_kernels.py [--rounds 7]     # CPU, the benchmark shape (d=576, d_sae=4,608, batch 1,024)
    python benchmarks/sparse_kernels.py --device cuda    # the paper's size (d=768, d_sae=24,576, batch 4,096)

A code z of batch x k entries (k per row at random latents, row-major, as a selection gives them) and:
- decode, z W_dec [batch, d]: embedding_bag (saekit's); torch.sparse CSR @ dense (MKL on the CPU, cuSPARSE SpMM on
  a GPU); embedding_bag over a bf16 copy of W_dec; dense z @ W_dec (bf16 on a GPU, as autocast would run it).
- latent sums, z^T g [d_sae, d] (W_dec's gradient; W_enc's is the same with the centred input): embedding_bag over
  the entries grouped by latent (saekit's: the sort by latent included); the CSR of z^T @ g (the same sort); dense.
- value gradients, (g W_dec^T) at z's entries [batch x k]: embedding_bag's per-sample-weight backward (saekit's);
  torch.sparse.sampled_addmm (cuSPARSE SDDMM; the CPU's own); gather both rows and sum their product.
Each candidate's result is checked against saekit's first (relative error printed), then all are timed in
interleaved rounds (torch.utils.benchmark, which synchronises a GPU): the median, and x = saekit's ms / this one's
(above 1: faster than what saekit does now).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import benchmark

from saekit.metrics.intervals import resample_weights
from saekit.sae.kernels import CodeIndex, SparseCode, sparse_decode

SHAPES = {"cpu": dict(d=576, f=4608, B=1024, k=32), "cuda": dict(d=768, f=24_576, B=4096, k=32)}


def problem(d: int, f: int, B: int, k: int, device: torch.device, seed: int = 0) -> dict:
    """The code (k distinct random latents per row, row-major), decoder, output gradient and their indexes."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(B, f, generator=g).topk(k, dim=1).indices.reshape(-1)  # k distinct latents a row, any order
    rows = torch.arange(B).repeat_interleave(k)
    p = dict(rows=rows, cols=cols, vals=torch.rand(B * k, generator=g), W=torch.randn(f, d, generator=g),
             grad=torch.randn(B, d, generator=g))
    p = {n: t.to(device) for n, t in p.items()}
    p["index"] = CodeIndex(p["rows"], p["cols"], B, f, rows_sorted=True)
    p["shape"] = (B, f)
    return p


def candidates(p: dict, low: torch.dtype) -> dict[str, dict]:
    """{product: {method: fn}}; the first method of each is saekit's."""
    rows, cols, vals, W, g, shape = p["rows"], p["cols"], p["vals"], p["W"], p["grad"], p["shape"]
    B, f = shape
    crow = torch.searchsorted(rows, torch.arange(B + 1, device=rows.device))

    def dense(dtype):
        z = torch.zeros(shape, dtype=dtype, device=vals.device)
        z[rows, cols] = vals.to(dtype)
        return z

    def by_latent():  # saekit's sort by latent, the CSR of z^T needs the same
        order = torch.argsort(cols.to(torch.int32), stable=True)
        return order, torch.searchsorted(cols[order], torch.arange(f + 1, device=cols.device))

    def csr_t():
        order, ccol = by_latent()
        return torch.sparse_csr_tensor(ccol, rows[order], vals[order], (f, B)) @ g

    def sampled():
        mask = torch.sparse_csr_tensor(crow, cols, torch.zeros_like(vals), shape)
        return torch.sparse.sampled_addmm(mask, g, W.t(), beta=0.0).values()

    offsets = p["index"].row_offsets  # SparseDecode's backward reads the bags its forward made (offset2bag)
    offset2bag = torch.ops.aten._embedding_bag(W, cols, offsets, False, 0, False, vals)[1]

    def per_sample_weights_backward():
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(g, W, cols, offsets, offset2bag, 0)

    return {
        "decode z W_dec": {
            "embedding_bag (saekit)": lambda: sparse_decode(SparseCode(rows, cols, vals, shape, p["index"]), W),
            "CSR @ dense": lambda: torch.sparse_csr_tensor(crow, cols, vals, shape) @ W,
            "embedding_bag, bf16 W_dec": lambda: F.embedding_bag(cols, W.to(torch.bfloat16), crow[:-1], mode="sum",
                                                                 per_sample_weights=vals.to(torch.bfloat16)),
            f"dense {str(low).split('.')[1]}": lambda: dense(low) @ W.to(low),
        },
        "latent sums z^T g": {
            "embedding_bag by latent (saekit)": lambda: CodeIndex(rows, cols, B, f, rows_sorted=True).col_sum(vals, g),
            "CSR of z^T @ dense": csr_t,
            f"dense {str(low).split('.')[1]}": lambda: dense(low).t() @ g.to(low),
        },
        "value gradients (g W_dec^T)[z]": {
            "embedding_bag backward (saekit)": per_sample_weights_backward,
            "sampled_addmm (SDDMM)": sampled,
            "gather, multiply, sum": lambda: torch.linalg.vecdot(g[rows], W[cols]),
        },
    }


def measure(device: torch.device, d: int, f: int, B: int, k: int, rounds: int, number: int) -> list[dict]:
    """One row per (product, method): ms (median over interleaved rounds), x against saekit's, relative error."""
    low = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 products are emulated on most CPUs
    p = problem(d, f, B, k, device)
    rows = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # CSR's beta notice, invariant checks
        for product, methods in candidates(p, low).items():
            ref = None
            errors = {}
            for name, fn in methods.items():
                out = fn().float()
                ref = out if ref is None else ref
                errors[name] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            times = {name: [] for name in methods}
            for r in range(rounds):  # interleaved, the order rotated each round
                names = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
                for name in names:
                    timer = benchmark.Timer("fn()", globals={"fn": methods[name]}, num_threads=torch.get_num_threads())
                    times[name].append(timer.timeit(number).median * 1e3)
            base = times[next(iter(methods))]
            w = resample_weights(rounds, seed=1)
            for name, ts in times.items():
                ms = statistics.median(ts)
                # 95% interval of x (total times' ratio): a bootstrap over the rounds, each round's times paired
                ci = np.quantile((w @ np.array(base)) / (w @ np.array(ts)), [0.025, 0.975])
                rows.append(dict(product=product, method=name, ms=ms, x=statistics.median(base) / ms,
                                 x_interval=[float(ci[0]), float(ci[1])], ms_range=[min(ts), max(ts)],
                                 rel_error=errors[name]))
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'product':<32} {'method':<34} {'ms':>8} {'x':>5} {'95% interval':<13} {'rounds (ms)':<17} rel. error"]
    for r in rows:
        interval = "{:.2f}-{:.2f}".format(*r["x_interval"])
        spread = "{:.3f}-{:.3f}".format(*r["ms_range"])
        lines.append(f"{r['product']:<32} {r['method']:<34} {r['ms']:>8.3f} {r['x']:>5.2f} {interval:<13} {spread:<17} "
                     f"{r['rel_error']:.1e}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int)
    ap.add_argument("--d-sae", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=5, help="runs of a kernel per timing")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    shape = dict(SHAPES["cuda" if device.type == "cuda" else "cpu"])
    shape.update({n: v for n, v in (("d", a.d), ("f", a.d_sae), ("B", a.batch), ("k", a.k)) if v})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{device} ({name}, {torch.get_num_threads()} threads, torch {torch.__version__}): d={shape['d']}, "
          f"d_sae={shape['f']:,}, batch={shape['B']:,}, k={shape['k']}; {a.rounds} interleaved rounds of "
          f"{a.number} runs each")
    rows = measure(device, shape["d"], shape["f"], shape["B"], shape["k"], a.rounds, a.number)
    print(table(rows))
    print("x = saekit's ms / this method's ms (above 1: faster than saekit's), with a 95% bootstrap interval over "
          "the rounds (paired); ms: median over rounds; rel. error: |result - saekit's| / |saekit's|")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": name, "shape": shape, "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
