"""What each `saekit` subcommand does, given its parsed arguments (saekit/cli/ builds the parser
and calls these). Each is a thin call into the library; errors are raised as the library's own
and reported by cli.main."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path


def print_table(df, columns) -> None:
    """A results table on the terminal (the columns that exist)."""
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df[[c for c in columns if c in df]].to_string(index=False))


def cmd_capture(a) -> int:
    from .. import distributed
    from ..activations import capture
    from ..data import load_corpus, packed_corpus
    from ..models import load_model
    from ..plumbing.files import local_path, prepare_output, refuse_overlap
    from ..plumbing.locks import writer_lock

    if distributed.launched_by_torchrun():  # each rank captures its own shards into the same store
        a.device = distributed.init_from_env(a.device, timeout_s=7 * 24 * 3600)
    rank0 = distributed.rank() == 0
    try:
        with contextlib.ExitStack() as held:
            # before the model loads: a second writer or a bad folder is told at once
            def claim() -> None:
                inputs = {"corpus": local_path(a.corpus), "model": local_path(a.model)}
                refuse_overlap(a.out, inputs, "store folder")
                prepare_output(a.out, 0, "store folder")
                held.enter_context(writer_lock(a.out, "capture"))

            # a bad corpus or split, told at once and before the folder is made
            load_corpus(a.corpus, split=a.split, text_field=a.text_field)
            distributed.on_rank0(claim)
            model = load_model(a.model, device=a.device)
            packed = packed_corpus(
                model.tokenizer,
                a.corpus,
                split=a.split,
                seq_len=a.seq_len,
                max_tokens=a.tokens,
                text_field=a.text_field,
                drop_bos=not a.keep_bos,
                shuffle=not a.no_shuffle,
                seed=a.sample_seed,
            )
            store = capture(
                model,
                packed,
                a.hook,
                a.out,
                n_tokens=a.tokens,
                batch_size=a.batch_size,
                dtype=a.dtype,
                shard_tokens=a.shard_tokens,
                overwrite=a.overwrite,
                progress=rank0,
            )
    finally:
        distributed.shutdown()
    if rank0:
        print(store)
    return 0


def cmd_export_store(a) -> int:
    from ..activations import export_store

    out = export_store(
        a.store, a.out, format=a.format, context_size=a.context_size, overwrite=a.overwrite
    )
    print(f"wrote {out}")
    return 0


def _sae_cfgs(a, src):
    """SAE configs for `train`/`sweep`: every --arch at every level (--k, or --l1-coeff for
    ReLU-L1), with the store's provenance (model, hook, context size, corpus) when the data is a
    store."""
    from ..jobs.sweep import sweep_configs

    if hasattr(src, "hooks"):  # a stream: every SAE at every hook
        fields = src.identity()["fields"]
        metas = [
            {
                "model_name": fields["model"],
                "hook_name": h,
                "context_size": fields["seq_len"],
                "dataset": fields["corpus"],
            }
            for h in src.hooks
        ]
    else:
        man = src.store.manifest if hasattr(src, "store") else {}
        hook = a.hook[0] if isinstance(a.hook, list) else a.hook
        metas = [
            {
                "model_name": man.get("model"),
                "hook_name": hook or (man.get("hooks") or [None])[0],
                "context_size": man.get("seq_len"),
                "dataset": (man.get("corpus") or {}).get("corpus"),
            }
        ]
    return [
        cfg
        for meta in metas
        for cfg in sweep_configs(
            src.d_model,
            a.arch,
            a.k,
            a.expansion,
            a.l1_coeff,
            normalize=a.normalize,
            dead_tokens=5 * a.batch_size,
            enc_init_norm=a.enc_init_norm,
            **meta,
        )
    ]


def _train_cfg(a):
    from ..train import TrainConfig
    from ..train.config import PRECISIONS

    return TrainConfig(
        total_tokens=a.tokens,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        device=a.device,
        checkpoint_every=a.checkpoint_every,
        warmup_steps=a.warmup_steps,
        step_graphs=a.step_graphs,
        autocast=PRECISIONS[a.precision],
    )


def _print_lrs(cfgs, tc) -> None:
    from ..distributed import world_size
    from ..models import default_device
    from ..train.trainer import unique_names

    names = unique_names(cfgs)  # as the run names them: by hook where names repeat
    for name, c in zip(names, cfgs):
        print(
            f"learning rate of {name}: {tc.lr_for(c.d_sae):.2e}"
            + (" (--lr)" if tc.lr is not None else f" (default for {c.d_sae:,} latents)")
        )
    device = tc.device or default_device()
    auto = (
        " (--precision auto: bf16 where the device and the SAE's size make it pay)"
        if tc.autocast is None
        else ""
    )
    # a rank's batch
    uses = {
        n: tc.uses_autocast(device, c, tc.batch_size // world_size()) for n, c in zip(names, cfgs)
    }
    if len(set(uses.values())) == 1:
        print(
            f"precision: {'bf16 autocast' if next(iter(uses.values())) else 'fp32'} on "
            f"{device}{auto}"
        )
    else:
        for name, bf16 in uses.items():
            print(f"precision of {name}: {'bf16 autocast' if bf16 else 'fp32'} on {device}{auto}")


def cmd_train(a) -> int:
    from .. import distributed
    from ..train import train

    if a.distributed or distributed.launched_by_torchrun():
        # DDP over torchrun's ranks; --batch-size is the global batch
        distributed.init_from_env(a.device)
    rank = distributed.rank()
    src = _training_data(a)
    cfgs, tc = _sae_cfgs(a, src), _train_cfg(a)
    if rank == 0:
        _print_lrs(cfgs, tc)
    try:
        res = train(src, cfgs, tc, out=a.out, resume=not a.no_resume)
    finally:
        distributed.shutdown()
    if rank == 0:
        print(res.summary())
    return 0


def _training_data(a):
    """train's data: the store (one --hook), or a stream from the running model (--model)."""
    from ..train import TrainingError, as_source

    if a.store is not None and a.model is not None:
        raise TrainingError(
            "--store and --model both given: train on a captured store (--store) or straight "
            "from the model (--model), not both"
        )
    if a.store is None and a.model is None:
        raise TrainingError("no data: give --store (a captured store) or --model (train from it)")
    if a.store is not None:
        if a.hook and len(a.hook) > 1:
            raise TrainingError(
                "a store trains at one --hook; several hooks from one forward need --model"
            )
        return as_source(a.store, a.hook[0] if a.hook else None)
    import torch

    from ..models import load_model
    from ..train.stream import ModelSource

    if not a.hook:
        raise TrainingError("--model needs at least one --hook (e.g. --hook resid_post.15)")
    dtype = getattr(torch, a.model_dtype) if a.model_dtype else None
    model = load_model(None if a.model == "embedded" else a.model, device=a.device, dtype=dtype)
    return ModelSource(
        model,
        a.hook,
        corpus=a.corpus,
        split=a.split,
        seq_len=a.seq_len,
        forward_batch=a.forward_batch,
        window_batches=a.window_batches,
        text_field=a.text_field,
    )


def _model_for(a, store):
    """The model for downstream metrics: --model, else the one the (opened) store was captured
    from."""
    if a.no_ce:
        return None
    from ..models import load_model

    return load_model(a.model or store.source_model(), device=a.device)


def cmd_eval(a) -> int:
    from ..activations import open_store
    from ..metrics import describe, evaluate
    from ..plumbing.checks import hook_on_store
    from ..plumbing.files import OutputError, atomic_write_json, prepare_output, refuse_overlap
    from ..sae import load_sae

    sae = load_sae(a.sae_dir)
    store = open_store(a.store)  # opened once: the model's name and the data come from it
    hook_on_store(sae, store, a.hook, a.allow_mismatch)  # before the model loads
    if a.out:
        refuse_overlap(a.out, {"SAE folder": a.sae_dir, "store": a.store}, "evaluation file")
        prepare_output(Path(a.out).parent, 0, "folder of --out")
        if Path(a.out).is_dir():
            raise OutputError(
                f"--out {a.out} is a folder; give a file name for the evaluation's JSON"
            )
    m = evaluate(
        sae,
        _model_for(a, store),
        store,
        n_tokens=a.tokens,
        ce_tokens=a.ce_tokens,
        mode=a.mode,
        hook=a.hook,
        progress=not a.json,
        allow_mismatch=a.allow_mismatch,
    )
    m = {**m, "sae_dir": str(a.sae_dir), "store": str(a.store)}
    if a.out:
        atomic_write_json(Path(a.out), m)
    print(json.dumps(m, indent=2) if a.json else f"{a.sae_dir}: {describe(m)}")
    return 0


def cmd_calibrate(a) -> int:
    from ..calibrate import calibrate_folder

    r = calibrate_folder(
        a.sae_dir,
        a.store,
        target_l0=a.target_l0,
        n_tokens=a.tokens,
        hook=a.hook,
        allow_mismatch=a.allow_mismatch,
    )
    before = f"{r['l0_before']:.2f}" if r["l0_before"] is not None else "n/a"
    theta_before = f"{r['theta_before']:.5f}" if r["theta_before"] is not None else "none"
    print(
        f"{a.sae_dir}: theta {theta_before} -> {r['theta']:.5f}; threshold-mode L0 on "
        f"{r['n_tokens']:,} tokens of "
        f"{r['store']}: {before} -> {r['l0_after']:.2f} (target {r['target_l0']:g}); written to "
        "cfg.json and "
        f"sae_weights.safetensors"
    )
    return 0


def cmd_compare(a) -> int:
    from ..metrics import compare_lines, read_evaluation

    ea, eb = read_evaluation(a.eval_a), read_evaluation(a.eval_b)
    names = a.names or (ea["sae"].get("architecture", "A"), eb["sae"].get("architecture", "B"))
    for line in compare_lines(ea, eb, tuple(names), a.metrics, a.allow_mismatch):
        print(line)
    return 0


def cmd_sweep(a) -> int:
    from ..activations import open_store
    from ..jobs.sweep import sweep
    from ..train import as_source

    src = as_source(a.store, a.hook)
    cfgs, tc = _sae_cfgs(a, src), _train_cfg(a)
    _print_lrs(cfgs, tc)
    held = open_store(a.eval_store or a.store)
    df = sweep(
        src,
        cfgs,
        tc,
        a.out,
        eval_data=held,
        model=_model_for(a, held),
        eval_tokens=a.eval_tokens,
        ce_tokens=a.ce_tokens,
        hook=cfgs[0].hook_name,
        allow_mismatch=a.allow_mismatch,
    )
    print_table(df, ["name", "l0", "nmse", "fvu", "ce_recovered", "kl", "dead_fraction"])
    print(f"-> {a.out}/sweep.csv, sweep.parquet")
    return 0


def cmd_sweep_report(a) -> int:
    from ..jobs.sweep_report import write_report

    tables = write_report(a.sweep_dirs, a.out, title=a.title)
    for name, t in tables.items():
        print(f"\n{name}:")
        print_table(t, [c for c in t.columns if c != "text"])
    print(f"\n-> {a.out}/")
    return 0


def cmd_report(a) -> int:
    from ..jobs.report import build_report

    print(build_report(a.run_dir, latents=a.latents))
    return 0


def cmd_bench(a) -> int:
    from ..bench import bench, format_table

    table = bench(
        a.sae_dirs,
        a.evals,
        model_name=a.model,
        out=a.out,
        corpus=a.corpus,
        overwrite=a.overwrite,
        allow_mismatch=a.allow_mismatch,
    )
    print(format_table(table))
    print(f"\n-> {a.out}/ (SAEBench's JSON, one file per evaluation and SAE)")
    return 0


def cmd_notebooks(a) -> int:
    from ..jobs.notebooks import copy_notebooks

    paths = copy_notebooks(a.dir, overwrite=a.overwrite)
    print(
        f"{len(paths)} notebooks in {a.dir}: {', '.join(p.name for p in paths)}\n"
        f"open them with: jupyter lab {a.dir}"
    )
    return 0


def cmd_demo(a) -> int:
    from ..jobs.demo import DemoConfig, run_demo

    run_demo(DemoConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(DemoConfig)}))
    return 0
