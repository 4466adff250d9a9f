"""`saekit capture / train / eval / demo` on top of the library functions."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .metrics import CE_TOKENS

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
    p.add_argument("--split", default="train", help="split of the corpus (bundled: train, test or all)")
    p.add_argument("--text-field", default="text", help="column holding the text")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence, BOS included")
    p.add_argument("--sample-seed", type=int, default=0,
                   help="seed of the random document order (documents are drawn from across the whole split)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="pack documents in corpus order instead (the first N tokens of the split)")


def cmd_capture(a) -> int:
    from .activations import capture
    from .data import packed_corpus
    from .models import load_model

    model = load_model(a.model, device=a.device)
    packed = packed_corpus(model.tokenizer, a.corpus, split=a.split, seq_len=a.seq_len, max_tokens=a.tokens,
                           text_field=a.text_field, drop_bos=not a.keep_bos, shuffle=not a.no_shuffle,
                           seed=a.sample_seed)
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


def _print_lrs(cfgs, tc) -> None:
    for c in cfgs:
        print(f"learning rate of {c.name}: {tc.lr_for(c.d_sae):.2e}"
              + (" (--lr)" if tc.lr is not None else f" (default for {c.d_sae:,} latents)"))


def cmd_train(a) -> int:
    from . import distributed
    from .train import as_source, train

    if a.distributed or distributed.launched_by_torchrun():
        distributed.init_from_env(a.device)  # DDP over torchrun's ranks; --batch-size is the global batch
    rank = distributed.rank()
    src = as_source(a.store, a.hook)
    cfgs, tc = _sae_cfgs(a, src), _train_cfg(a)
    if rank == 0:
        _print_lrs(cfgs, tc)
    try:
        res = train(src, cfgs, tc, out=a.out, resume=not a.no_resume)
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
    from .metrics import describe, evaluate
    from .sae import load_sae

    sae = load_sae(a.sae_dir)
    model = _model_for(a, a.store)
    m = evaluate(sae, model, a.store, n_tokens=a.tokens, ce_tokens=a.ce_tokens, mode=a.mode, hook=a.hook,
                 progress=not a.json)
    m = {**m, "sae_dir": str(a.sae_dir), "store": str(a.store)}
    if a.out:
        from .activations import atomic_write_json

        atomic_write_json(Path(a.out), m)
    print(json.dumps(m, indent=2) if a.json else f"{a.sae_dir}: {describe(m)}")
    return 0


def cmd_calibrate(a) -> int:
    from .calibrate import calibrate_folder

    r = calibrate_folder(a.sae_dir, a.store, target_l0=a.target_l0, n_tokens=a.tokens)
    before = f"{r['l0_before']:.2f}" if r["l0_before"] is not None else "n/a"
    theta_before = f"{r['theta_before']:.5f}" if r["theta_before"] is not None else "none"
    print(f"{a.sae_dir}: theta {theta_before} -> {r['theta']:.5f}; threshold-mode L0 on {r['n_tokens']:,} tokens of "
          f"{r['store']}: {before} -> {r['l0_after']:.2f} (target {r['target_l0']:g}); written to cfg.json and "
          f"sae_weights.safetensors")
    return 0


def cmd_compare(a) -> int:
    from .metrics import CE_STATS, RECON_STATS, format_difference, paired_difference

    ea, eb = (json.loads(Path(f).read_text()) for f in (a.eval_a, a.eval_b))
    name = lambda m, f: a.names[["a", "b"].index(f)] if a.names else f"{m['sae']['architecture']}"
    for metric in a.metrics or [*RECON_STATS, *CE_STATS]:
        if metric in CE_STATS and not (ea.get("per_sequence") or {}).get("ce"):
            continue
        print(format_difference(paired_difference(ea, eb, metric), name(ea, "a"), name(eb, "b")))
    return 0


def cmd_sweep(a) -> int:
    from .sweep import sweep
    from .train import as_source

    src = as_source(a.store, a.hook)
    cfgs = _sae_cfgs(a, src)
    _print_lrs(cfgs, _train_cfg(a))
    model = _model_for(a, a.eval_store or a.store)
    df = sweep(src, cfgs, _train_cfg(a), a.out, eval_data=a.eval_store or a.store, model=model,
               eval_tokens=a.eval_tokens, ce_tokens=a.ce_tokens, hook=cfgs[0].hook_name)
    with __import__("pandas").option_context("display.width", 200, "display.max_columns", 30):
        print(df[["name", "l0", "nmse", "fvu", "ce_recovered", "kl", "dead_fraction"]].to_string(index=False))
    print(f"-> {a.out}/sweep.csv, sweep.parquet")
    return 0


def cmd_demo(a) -> int:
    """The main job on embedded defaults: capture, train, calibrate theta, evaluate, write a results folder."""
    from .activations import atomic_write_json, capture_splits
    from .calibrate import calibrate
    from .metrics import describe, evaluate, per_token_l0
    from .models import load_model
    from .sae import SAEConfig
    from .train import TrainConfig, train

    out = Path(a.out)
    t0 = time.perf_counter()
    print("[1/6] loading the embedded model (first run builds a cache, ~30 s)")
    model = load_model(device=a.device)
    print(f"[2/6] capturing {a.hook} on the bundled corpus, documents drawn at random from each whole split: "
          f"{a.tokens:,} training tokens, {a.calib_tokens:,} more from unseen training documents (to calibrate "
          f"theta on) and {a.eval_tokens:,} held-out tokens")
    store, held, calib_store = capture_splits(model, a.hook, out, a.tokens, a.eval_tokens, calib_tokens=a.calib_tokens)
    print(f"[3/6] training BatchTopK and TopK SAEs (k={a.k}, {a.expansion}x = {store.d_model * a.expansion} latents) "
          f"on one stream of {a.train_tokens:,} tokens")
    common = dict(d_in=store.d_model, d_sae=store.d_model * a.expansion, k=a.k, dead_tokens=5 * a.batch_size,
                  hook_name=a.hook, model_name=store.manifest["model"], context_size=store.manifest["seq_len"],
                  dataset="bundled")
    cfgs = [SAEConfig(arch="batchtopk", **common), SAEConfig(arch="topk", **common)]
    tc = TrainConfig(total_tokens=a.train_tokens, batch_size=a.batch_size, lr=a.lr, warmup_steps=20,
                     checkpoint_every=50, device=a.device)
    print(f"      learning rate {tc.lr_for(cfgs[0].d_sae):.2e} ({'--lr' if a.lr else 'default for ' + str(cfgs[0].d_sae) + ' latents'})")
    res = train(store, cfgs, tc, out=out / "train")
    sae, sae_dir = res.saes[0], out / "train" / res.names[0]
    theta_trained = float(sae.threshold)
    l0_trained = float(per_token_l0(sae, held, a.eval_tokens).mean())
    print(f"[4/6] theta from training {theta_trained:.4f}: held-out threshold-mode L0 {l0_trained:.2f} (k = {a.k}); "
          f"calibrating theta on {len(calib_store):,} tokens of training-split documents the SAE never saw "
          f"(not the held-out ones)")
    cal = calibrate(sae, calib_store)
    sae.save(sae_dir)
    print(f"      theta {theta_trained:.4f} -> {cal['theta']:.4f} (L0 on the calibration store "
          f"{cal['l0_before']:.2f} -> {cal['l0_after']:.2f})")
    print(f"[5/6] evaluating the BatchTopK SAE on held-out text (reconstruction, sparsity, CE with it spliced in "
          f"on {a.ce_tokens:,} positions)")
    m = evaluate(sae, model, held, n_tokens=a.eval_tokens, ce_tokens=a.ce_tokens, progress=True)
    summary = {**m, "store_train": str(out / "store_train"), "store_test": str(out / "store_test"),
               "store_calib": str(out / "store_calib"),
               "sae_dir": str(sae_dir), "train_tokens": res.tokens, "train_steps": res.steps,
               "lr": tc.lr_for(sae.cfg.d_sae), "theta": cal["theta"], "theta_trained": theta_trained,
               "l0_threshold_mode_trained_theta": l0_trained, "l0_batch_mode": m["sparsity"]["l0_batch_mode"],
               "ce_tokens": m["downstream"]["n_tokens"], "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "metrics.json", summary)
    print("\nheld-out, " + describe(m))
    print(f"  held-out L0 / k: {l0_trained / a.k:.3f} with the trained theta, {m['sparsity']['l0'] / a.k:.3f} "
          f"after calibrating on unseen training-split text")
    print("[6/6] writing the report")
    from .report import build_report

    report = build_report(out, model=model)
    print(f"results in {out}/: metrics.json, {report.name} (open it in a browser), train/{res.names[0]}/ and "
          f"train/{res.names[1]}/ (cfg.json, sae_weights.safetensors, train_log.csv); "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


def cmd_sweep_report(a) -> int:
    from .sweep_report import main as report_main

    report_main([*a.sweep_dirs, a.out])
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
        p.add_argument("--tokens", type=int, default=tokens, help="training tokens (epochs over the store if larger)")
        p.add_argument("--batch-size", type=int, default=4096, help="tokens per step (the global batch under torchrun)")
        p.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: 8e-4 / sqrt(d_sae / 2^14), larger for small dictionaries)")
        p.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
        p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
        p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="steps between checkpoints (0: at the end)")
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda where available)")
        p.add_argument("--out", required=True)

    t = sub.add_parser("train", help="train SAE(s) on a store (or .npy/.safetensors), one read per batch")
    add_training_args(t, ["batchtopk"], [32], [5.0], 1_000_000, 0)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--distributed", action="store_true",
                   help="train with torch.distributed DDP (launch with torchrun --nproc_per_node N -m saekit train ...; "
                        "implied under torchrun); --batch-size is the global batch")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a saved SAE: reconstruction, sparsity, downstream CE, with 95%% intervals")
    e.add_argument("sae_dir")
    e.add_argument("--store", required=True, help="activation store to evaluate on (its tokens feed the CE metrics)")
    e.add_argument("--hook", default=None, help="hook point (default: the SAE's)")
    e.add_argument("--mode", default=None, choices=["threshold", "batch"],
                   help="BatchTopK's code: threshold (default, theta) or batch (top B*k of each batch)")
    e.add_argument("--tokens", type=int, default=20_000, help="activations for reconstruction/sparsity")
    e.add_argument("--ce-tokens", type=int, default=CE_TOKENS,
                   help="scored positions for the CE metrics, from sequences drawn across the whole store")
    e.add_argument("--model", default=None, help="model for CE metrics; default: the store's model")
    e.add_argument("--no-ce", action="store_true", help="skip the downstream metrics (no model needed)")
    e.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda where available)")
    e.add_argument("--json", action="store_true", help="print the whole result as JSON")
    e.add_argument("--out", default=None, help="also write the result (with per-sequence sums) to this JSON file")
    e.set_defaults(fn=cmd_eval)

    cal = sub.add_parser("calibrate", help="set a BatchTopK SAE's theta so threshold-mode L0 on a store equals a target")
    cal.add_argument("sae_dir")
    cal.add_argument("--store", required=True, help="store to calibrate on (use one that is not your evaluation store)")
    cal.add_argument("--target-l0", type=float, default=None, help="mean latents per token (default: the SAE's k)")
    cal.add_argument("--tokens", type=int, default=None, help="rows of the store to use (default: all)")
    cal.set_defaults(fn=cmd_calibrate)

    cmp_ = sub.add_parser("compare", help="paired difference of two evaluations (saekit eval --out) with 95%% intervals")
    cmp_.add_argument("eval_a")
    cmp_.add_argument("eval_b")
    cmp_.add_argument("--metrics", nargs="+", default=None, help="default: nmse, mse_normalized, l0, ce_recovered, "
                                                                   "ce_recovered_mean, ce_delta, kl")
    cmp_.add_argument("--names", nargs=2, default=None, help="labels of A and B (default: their architectures)")
    cmp_.set_defaults(fn=cmd_compare)

    w = sub.add_parser("sweep", help="train several architectures/sparsities on one stream, evaluate each, one table")
    add_training_args(w, ["batchtopk", "topk", "jumprelu"], [16, 32, 64], [1.0, 3.0, 10.0], 2_000_000, 200)
    w.add_argument("--eval-store", default=None, help="held-out store (default: --store)")
    w.add_argument("--eval-tokens", type=int, default=20_000)
    w.add_argument("--ce-tokens", type=int, default=CE_TOKENS, help="scored positions for each SAE's CE metrics")
    w.add_argument("--model", default=None)
    w.add_argument("--no-ce", action="store_true")
    w.set_defaults(fn=cmd_sweep)

    sr = sub.add_parser("sweep-report", help="tables and figures of one or several (e.g. one per seed) sweeps")
    sr.add_argument("sweep_dirs", nargs="+", help="sweep output folders (saekit sweep --out)")
    sr.add_argument("--out", required=True, help="folder for sweep.csv, by_k.md, differences.md, frontier.html, ...")
    sr.set_defaults(fn=cmd_sweep_report)

    r = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained figures of a demo run)")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)

    d = sub.add_parser("demo", help="the main job on the embedded model and bundled corpus")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--hook", default=DEMO_HOOK)
    d.add_argument("--tokens", type=int, default=320_000, help="training tokens to capture")
    d.add_argument("--calib-tokens", type=int, default=20_000,
                   help="tokens of further training-split documents to calibrate theta on")
    d.add_argument("--eval-tokens", type=int, default=20_000)
    d.add_argument("--train-tokens", type=int, default=480_000, help="SAE training tokens (epochs over the store)")
    d.add_argument("--k", type=int, default=32)
    d.add_argument("--expansion", type=int, default=8)
    d.add_argument("--batch-size", type=int, default=1024)
    d.add_argument("--lr", type=float, default=None, help="learning rate (default: TrainConfig's rule for the dictionary size)")
    d.add_argument("--ce-tokens", type=int, default=4096, help="scored positions for the CE metrics")
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
