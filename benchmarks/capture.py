"""Capture throughput of the embedded model: tokens/s of the stopped trace, of a full forward, and
of capture() end to end (trace + gather + atomic shard writes), measured in the same run.

    python benchmarks/capture.py [--hook resid_post.15] [--batch-size 16] [--seq-len 128]

Early stop should beat a full forward by about (layers + unembedding) / (layers run): the script
prints that expectation from the model's own parameter counts next to the measured ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from saekit.activations import capture, capture_throughput
from saekit.data import packed_corpus
from saekit.models import load_model, n_layers, resolve_hook, underlying


class _Stop(Exception):
    pass


def plain_hf_stopped(hf, ids, layer, n):
    """Baseline: the plain transformers forward, stopped by a hook that raises after block
    `layer`."""

    def hook(mod, inp, out):
        raise _Stop

    h = hf.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for i in range(n + 1):
                if i == 1:
                    t = time.perf_counter()
                try:
                    hf(ids)
                except _Stop:
                    pass
    finally:
        h.remove()
    return n * ids.numel() / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hook", default="resid_post.15")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    model = load_model(device=a.device)
    hf = underlying(model)
    packed = packed_corpus(
        model.tokenizer, seq_len=a.seq_len, max_tokens=a.batch_size * a.seq_len * (a.batches + 2)
    )
    layer = resolve_hook(model, a.hook).layer
    L = n_layers(model)
    print(
        f"{model.config._name_or_path if hasattr(model, 'config') else 'model'}: {L} "
        f"layers, hook {a.hook}, batch {a.batch_size} x {a.seq_len} tokens, "
        f"{torch.get_num_threads()} threads, device {next(hf.parameters()).device}"
    )
    ids = torch.from_numpy(packed.tokens[: a.batch_size].astype("int64")).to(
        next(hf.parameters()).device
    )
    base = plain_hf_stopped(hf, ids, layer, a.batches)
    stop = capture_throughput(
        model, packed, a.hook, batch_size=a.batch_size, n_batches_=a.batches, stop=True
    )
    full = capture_throughput(
        model, packed, a.hook, batch_size=a.batch_size, n_batches_=a.batches, stop=False
    )
    # expected ratio from FLOPs per token: blocks run (layer+1 of L) vs all blocks +
    # the unembedding matmul
    block = sum(p.numel() for p in hf.model.layers[0].parameters())
    unembed = hf.lm_head.weight.numel()
    expected = (L * block + unembed) / ((layer + 1) * block)
    n_tok = a.batch_size * a.seq_len * a.batches
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        st = capture(
            model, packed, a.hook, d, n_tokens=n_tok, batch_size=a.batch_size, progress=False
        )
        e2e = len(st) / (time.perf_counter() - t)
    print(
        "baseline: plain transformers forward stopped by a hook "
        f"after layer {layer}: {base:,.0f} tokens/s"
    )
    print(
        f"nnsight trace stopped after layer {layer}: "
        f"{stop:10,.0f} tokens/s = {stop / base:.2f}x baseline"
    )
    print(f"full forward (no trace):     {full:10,.0f} tokens/s")
    print(f"early-stop speed-up: {stop / full:.2f}x (expected from FLOPs: {expected:.2f}x)")
    print(
        f"capture() end to end:        {e2e:10,.0f} kept tokens/s (BOS "
        f"dropped, fp16 shards written) = {e2e / base:.2f}x baseline"
    )
    print(f"goal >= 1,000 tokens/s on the 2-core CPU: {'met' if e2e >= 1000 else 'NOT met'}")


if __name__ == "__main__":
    main()
