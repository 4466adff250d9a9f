"""`saekit capture / train / eval / demo` on top of the library functions."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_HOOK = "resid_post.15"  # mid-depth of SmolLM2's 30 layers, as the paper's GPT-2 layer 8 of 12


def enc_init_norm_arg(v: str) -> float | str:
    """--enc-init-norm: 'paper' or a positive number (SAEConfig.enc_init_norm)."""
    if v == "paper":
        return v
    try:
        norm = float(v)
    except ValueError:
        norm = 0.0
    if not norm > 0:
        raise argparse.ArgumentTypeError(f"enc-init-norm must be 'paper' or a positive number (got {v!r})")
    return norm


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None, help="'bundled' (default), a local .txt/.jsonl/.parquet file or folder, or a hub data set")
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=128)


def cmd_capture(a) -> int:
    from .activations import capture
    from .data import packed_corpus
    from .models import load_model

    model = load_model(a.model, device=a.device)
    packed = packed_corpus(model.tokenizer, a.corpus, split=a.split, seq_len=a.seq_len, max_tokens=a.tokens,
                           text_field=a.text_field, drop_bos=not a.keep_bos)
    store = capture(model, packed, a.hook, a.out, n_tokens=a.tokens, batch_size=a.batch_size, dtype=a.dtype,
                    overwrite=a.overwrite)
    print(store)
    return 0


def _sae_cfgs(a, src):
    """SAE configs for `train`/`sweep`: every --arch at every --k (ReLU: every --l1-coeff), with the
    store's provenance (model, hook, context size, corpus) when the data is a store."""
    from .sweep import sweep_configs

    man = src.store.manifest if hasattr(src, "store") else {}
    meta = {"model_name": man.get("model"), "hook_name": a.hook or (man.get("hooks") or [None])[0],
            "context_size": man.get("seq_len"), "dataset": (man.get("corpus") or {}).get("corpus")}
    return sweep_configs(src.d_model, a.arch, a.k, a.expansion, a.l1_coeff, normalize=a.normalize,
                         dead_tokens=5 * a.batch_size, enc_init_norm=a.enc_init_norm, **meta)


def _train_cfg(a):
    from .train import TrainConfig

    return TrainConfig(total_tokens=a.tokens, batch_size=a.batch_size, lr=a.lr, seed=a.seed, device=a.device,
                       checkpoint_every=a.checkpoint_every, warmup_steps=a.warmup_steps)


def cmd_train(a) -> int:
    from . import distributed
    from .train import as_source, train

    if a.distributed or distributed.launched_by_torchrun():
        distributed.init_from_env(a.device)  # DDP over torchrun's ranks; --batch-size is the global batch
    rank = distributed.rank()
    src = as_source(a.store, a.hook)
    try:
        res = train(src, _sae_cfgs(a, src), _train_cfg(a), out=a.out, resume=not a.no_resume)
    finally:
        distributed.shutdown()
    if rank != 0:
        return 0
    for name, log in zip(res.names, res.logs):
        last = log.iloc[-1]
        print(f"{name}: steps {res.steps}, tokens {res.tokens:,}, nmse {last['nmse']:.4f}, l0 {last['l0']:.1f}, "
              f"dead {last['dead_frac']:.3f} -> {Path(a.out) / name}")
    return 0


def _model_for(a, store_path):
    """The model for downstream metrics: --model, else the one the store was captured from."""
    if a.no_ce:
        return None
    from .activations import ActivationStore
    from .models import load_model

    name = a.model or ActivationStore(store_path).manifest.get("model")
    return load_model(name, device=a.device)


def cmd_eval(a) -> int:
    from .metrics import evaluate
    from .sae import load_sae

    sae = load_sae(a.sae_dir)
    model = _model_for(a, a.store)
    m = evaluate(sae, model, a.store, n_tokens=a.tokens, ce_tokens=a.ce_tokens, mode=a.mode, hook=a.hook,
                 progress=not a.json)
    m = {**m, "sae_dir": str(a.sae_dir), "store": str(a.store)}
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        r, sp, d = m["reconstruction"], m["sparsity"], m["downstream"]
        print(f"{a.sae_dir} ({m['sae']['architecture']}, {m['sae']['d_sae']} latents, {m['mode']} mode) on "
              f"{m['n_tokens']:,} tokens")
        print(f"  NMSE {r['nmse']:.4f}  FVU {r['fvu']:.4f}  cosine {r['cosine']:.4f}")
        print(f"  L0 {sp['l0']:.1f} (std {sp['l0_std']:.1f})  dead {sp['dead_fraction']:.3f}  dense {sp['dense_fraction']:.3f}")
        if d:
            print(f"  CE clean {d['ce_clean']:.4f}  with SAE {d['ce_sae']:.4f}  zero-ablated {d['ce_zero_ablation']:.4f}  "
                  f"mean-ablated {d['ce_mean_ablation']:.4f}")
            print(f"  CE recovered {d['ce_recovered']:.4f} (vs mean ablation {d['ce_recovered_mean']:.4f})  "
                  f"KL {d['kl']:.4f}  ({d['n_tokens']:,} tokens)")
    return 0


def cmd_sweep(a) -> int:
    from .sweep import sweep
    from .train import as_source

    src = as_source(a.store, a.hook)
    cfgs = _sae_cfgs(a, src)
    model = _model_for(a, a.eval_store or a.store)
    df = sweep(src, cfgs, _train_cfg(a), a.out, eval_data=a.eval_store or a.store, model=model,
               eval_tokens=a.eval_tokens, ce_tokens=a.ce_tokens, hook=cfgs[0].hook_name)
    with __import__("pandas").option_context("display.width", 200, "display.max_columns", 30):
        print(df[["name", "l0", "nmse", "fvu", "ce_recovered", "kl", "dead_fraction"]].to_string(index=False))
    print(f"-> {a.out}/sweep.csv, sweep.parquet")
    return 0


def cmd_demo(a) -> int:
    """The main job on embedded defaults: capture, train a BatchTopK SAE, evaluate, write a results folder."""
    from .activations import atomic_write_json, capture_splits
    from .metrics import evaluate, reconstruction_metrics
    from .models import load_model
    from .sae import SAEConfig
    from .train import TrainConfig, train

    out = Path(a.out)
    t0 = time.perf_counter()
    print("[1/5] loading the embedded model (first run builds a cache, ~30 s)")
    model = load_model(device=a.device)
    print(f"[2/5] capturing {a.hook} on the bundled corpus: {a.tokens:,} training + {a.eval_tokens:,} held-out tokens")
    store, held = capture_splits(model, a.hook, out, a.tokens, a.eval_tokens)
    print(f"[3/5] training BatchTopK and TopK SAEs (k={a.k}, {a.expansion}x = {store.d_model * a.expansion} latents) "
          f"on one stream of {a.train_tokens:,} tokens")
    common = dict(d_in=store.d_model, d_sae=store.d_model * a.expansion, k=a.k, dead_tokens=5 * a.batch_size,
                  hook_name=a.hook, model_name=store.manifest["model"], context_size=store.manifest["seq_len"],
                  dataset="bundled")
    cfgs = [SAEConfig(arch="batchtopk", **common), SAEConfig(arch="topk", **common)]
    res = train(store, cfgs, TrainConfig(total_tokens=a.train_tokens, batch_size=a.batch_size, lr=a.lr,
                                         warmup_steps=20, checkpoint_every=50, device=a.device), out=out / "train")
    sae = res.saes[0]
    print("[4/5] evaluating the BatchTopK SAE on held-out text (reconstruction, sparsity, CE with it spliced in)")
    m = evaluate(sae, model, held, n_tokens=a.eval_tokens, ce_tokens=a.ce_tokens, progress=True)
    batch_l0 = reconstruction_metrics(sae, held.batches(a.batch_size, shuffle=False), mode="batch")["l0"]
    summary = {**m, "store_train": str(out / "store_train"), "store_test": str(out / "store_test"),
               "sae_dir": str(out / "train" / res.names[0]), "train_tokens": res.tokens, "train_steps": res.steps,
               "theta": float(sae.threshold), "l0_batch_mode": batch_l0,
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "metrics.json", summary)
    r, sp, d = m["reconstruction"], m["sparsity"], m["downstream"]
    print(f"\nheld-out ({m['n_tokens']:,} tokens, threshold mode, theta={summary['theta']:.4f}):")
    print(f"  NMSE {r['nmse']:.4f}   FVU {r['fvu']:.4f}   cosine {r['cosine']:.4f}")
    print(f"  L0 mean {sp['l0']:.1f} (batch mode {batch_l0:.1f}); per-token quantiles "
          + ", ".join(f"q{float(q) * 100:g}={v:.0f}" for q, v in sp["l0_quantiles"].items()))
    print(f"  dead {sp['dead_fraction']:.3f}   dense {sp['dense_fraction']:.3f}")
    print(f"  CE clean {d['ce_clean']:.3f} -> with SAE {d['ce_sae']:.3f} (zero-ablated {d['ce_zero_ablation']:.3f}); "
          f"CE recovered {d['ce_recovered']:.4f}, KL {d['kl']:.4f} over {d['n_tokens']:,} tokens")
    print("[5/5] writing the report")
    from .report import build_report

    report = build_report(out, model=model)
    print(f"results in {out}/: metrics.json, {report.name} (open it in a browser), train/{res.names[0]}/ and "
          f"train/{res.names[1]}/ (cfg.json, sae_weights.safetensors, train_log.csv); "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


def cmd_report(a) -> int:
    from .report import build_report

    print(build_report(a.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saekit", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("capture", help="capture activations into a resumable store")
    c.add_argument("--model", default=None, help="hub id or local folder; default: the embedded SmolLM2-135M-Instruct")
    c.add_argument("--hook", action="append", required=True, help="e.g. resid_post.15 (repeat for several)")
    c.add_argument("--tokens", type=int, default=200_000)
    c.add_argument("--out", required=True)
    c.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    c.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    c.add_argument("--keep-bos", action="store_true", help="keep BOS positions (dropped by default)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--device", default=None)
    _add_corpus_args(c)
    c.set_defaults(fn=cmd_capture)

    def add_training_args(p, archs, ks, l1, tokens, checkpoint_every):
        p.add_argument("--store", required=True, help="activation store folder, or a .npy/.safetensors [N, d] file")
        p.add_argument("--hook", default=None)
        p.add_argument("--arch", nargs="+", default=archs, choices=["batchtopk", "topk", "jumprelu", "relu", "matryoshka"])
        p.add_argument("--k", nargs="+", type=int, default=ks, help="k; JumpReLU's target L0")
        p.add_argument("--l1-coeff", nargs="+", type=float, default=l1, help="ReLU-L1 penalties")
        p.add_argument("--expansion", type=int, default=8)
        p.add_argument("--normalize", default="token", choices=["none", "token", "dataset"])
        p.add_argument("--enc-init-norm", default="paper", type=enc_init_norm_arg,
                       help="starting norm of each encoder column: 'paper' (default: sqrt(2 d_in / d_sae), as "
                            "the BatchTopK paper's code draws it) or a number (1: the decoder transposed)")
        p.add_argument("--tokens", type=int, default=tokens)
        p.add_argument("--batch-size", type=int, default=4096)
        p.add_argument("--lr", type=float, default=3e-4)
        p.add_argument("--warmup-steps", type=int, default=100)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
        p.add_argument("--device", default=None)
        p.add_argument("--out", required=True)

    t = sub.add_parser("train", help="train SAE(s) on a store (or .npy/.safetensors), one read per batch")
    add_training_args(t, ["batchtopk"], [32], [5.0], 1_000_000, 0)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--distributed", action="store_true",
                   help="train with torch.distributed DDP (launch with torchrun --nproc_per_node N -m saekit train ...; "
                        "implied under torchrun); --batch-size is the global batch")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a saved SAE: reconstruction, sparsity, downstream CE (JSON schema in README)")
    e.add_argument("sae_dir")
    e.add_argument("--store", required=True, help="activation store to evaluate on (its tokens feed the CE metrics)")
    e.add_argument("--hook", default=None)
    e.add_argument("--mode", default=None, choices=["threshold", "batch"])
    e.add_argument("--tokens", type=int, default=20_000, help="activations for reconstruction/sparsity")
    e.add_argument("--ce-tokens", type=int, default=2048, help="scored positions for the CE metrics")
    e.add_argument("--model", default=None, help="model for CE metrics; default: the store's model")
    e.add_argument("--no-ce", action="store_true", help="skip the downstream metrics (no model needed)")
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    w = sub.add_parser("sweep", help="train several architectures/sparsities on one stream, evaluate each, one table")
    add_training_args(w, ["batchtopk", "topk", "jumprelu"], [16, 32, 64], [1.0, 3.0, 10.0], 2_000_000, 200)
    w.add_argument("--eval-store", default=None, help="held-out store (default: --store)")
    w.add_argument("--eval-tokens", type=int, default=20_000)
    w.add_argument("--ce-tokens", type=int, default=2048)
    w.add_argument("--model", default=None)
    w.add_argument("--no-ce", action="store_true")
    w.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained figures of a demo run)")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)

    d = sub.add_parser("demo", help="the main job on the embedded model and bundled corpus")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--hook", default=DEMO_HOOK)
    d.add_argument("--tokens", type=int, default=120_000, help="training tokens to capture")
    d.add_argument("--eval-tokens", type=int, default=20_000)
    d.add_argument("--train-tokens", type=int, default=480_000, help="SAE training tokens (epochs over the store)")
    d.add_argument("--k", type=int, default=32)
    d.add_argument("--expansion", type=int, default=8)
    d.add_argument("--batch-size", type=int, default=1024)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--ce-tokens", type=int, default=1024)
    d.add_argument("--device", default=None)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .activations import StoreError
    from .data import CorpusError
    from .models import HookPointError, ModelLoadError
    from .sae import SAEConfigError
    from .train import TrainingError

    try:
        return args.fn(args)
    except (StoreError, CorpusError, HookPointError, ModelLoadError, SAEConfigError, TrainingError) as e:
        print(f"saekit {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
