"""The main job on the embedded defaults (`saekit demo`): capture, train, calibrate theta,
evaluate, report."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..activations import capture_splits
from ..calibrate import calibrate
from ..metrics import describe, evaluate, per_token_l0
from ..models import default_device, load_model
from ..plumbing.files import atomic_write_json, prepare_output
from ..sae import SAEConfig
from ..train import TrainConfig, train
from .report import build_report

DEMO_HOOK = "resid_post.15"  # mid-depth of SmolLM2's 30 layers, as the paper's GPT-2 layer 8 of 12


@dataclass
class DemoConfig:
    """What the demo does; `saekit demo` takes each field as a flag with this default."""

    out: str = "runs/demo"  # results folder
    hook: str = DEMO_HOOK  # hook point of the embedded model
    # training tokens to capture (documents drawn at random from the train split)
    tokens: int = 320_000
    # tokens of further, never-trained-on training documents to calibrate theta on
    calib_tokens: int = 20_000
    eval_tokens: int = 20_000  # held-out tokens (the test split) to evaluate on
    train_tokens: int = 480_000  # SAE training tokens (1.5 epochs over the captured ones)
    k: int = 32  # latents per token (BatchTopK: on average)
    expansion: int = 8  # latents per input dimension
    batch_size: int = 1024  # tokens per training step
    # None: TrainConfig's rule for the dictionary size (saekit.train.default_lr)
    lr: float | None = None
    ce_tokens: int = 4096  # scored positions for the CE metrics
    device: str | None = None  # None: cuda where available, else cpu


def run_demo(c: DemoConfig) -> dict:
    """Capture, train BatchTopK and TopK on one stream, calibrate the BatchTopK's theta on unseen
    training text, evaluate it on held-out text, write metrics.json and report.html. Returns the
    metrics.json dict."""
    out = prepare_output(c.out, 0, "demo output folder")  # before the work: a folder, writable
    t0 = time.perf_counter()
    print("[1/6] loading the embedded model (first run builds a cache, ~30 s)")
    model = load_model(device=c.device)
    print(
        f"[2/6] capturing {c.hook} on the bundled corpus, documents drawn at random from each "
        f"whole split: {c.tokens:,} training tokens, {c.calib_tokens:,} more from unseen "
        f"training documents (to calibrate theta on) and {c.eval_tokens:,} held-out tokens"
    )
    store, held, calib_store = capture_splits(
        model, c.hook, out, c.tokens, c.eval_tokens, calib_tokens=c.calib_tokens
    )
    res, tc, bf16 = _train(c, store, out)
    sae, sae_dir = res.saes[0], out / "train" / res.names[0]
    theta_trained = float(sae.threshold)
    l0_trained = float(per_token_l0(sae, held, c.eval_tokens).mean())
    cal = _calibrate(c, sae, sae_dir, calib_store, theta_trained, l0_trained)
    print(
        "[5/6] evaluating the BatchTopK SAE on held-out text (reconstruction, sparsity, CE with "
        f"it spliced in on {c.ce_tokens:,} positions)"
    )
    m = evaluate(sae, model, held, n_tokens=c.eval_tokens, ce_tokens=c.ce_tokens, progress=True)
    summary = {
        **m,
        **{f"store_{s}": str(out / f"store_{s}") for s in ("train", "test", "calib")},
        "sae_dir": str(sae_dir),
        "train_tokens": res.tokens,
        "train_steps": res.steps,
        "lr": tc.lr_for(sae.cfg.d_sae),
        "autocast": bf16,
        "theta": cal["theta"],
        "theta_trained": theta_trained,
        "l0_threshold_mode_trained_theta": l0_trained,
        "l0_batch_mode": m["sparsity"]["l0_batch_mode"],
        "ce_tokens": m["downstream"]["n_tokens"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(out / "metrics.json", summary)
    print("\nheld-out, " + describe(m))
    print(
        f"  held-out L0 / k: {l0_trained / c.k:.3f} with the trained theta, "
        f"{m['sparsity']['l0'] / c.k:.3f} after calibrating on unseen training-split text"
    )
    print("[6/6] writing the report")
    report = build_report(out, model=model)
    print(
        f"results in {out}/: metrics.json, {report.name} (open it in a browser), "
        f"train/{res.names[0]}/ and train/{res.names[1]}/ (cfg.json, sae_weights.safetensors, "
        f"train_log.csv); {time.perf_counter() - t0:.0f} s in all"
    )
    return summary


def _calibrate(c: DemoConfig, sae, sae_dir, calib_store, theta_trained, l0_trained) -> dict:
    """Step 4: θ calibrated on training-split text the SAE never saw; the SAE saved with it."""
    print(
        f"[4/6] theta from training {theta_trained:.4f}: held-out threshold-mode L0 "
        f"{l0_trained:.2f} (k = {c.k}); calibrating theta on {len(calib_store):,} tokens of "
        "training-split documents the SAE never saw (not the held-out ones)"
    )
    cal = calibrate(sae, calib_store)
    sae.save(sae_dir)
    print(
        f"      theta {theta_trained:.4f} -> {cal['theta']:.4f} (L0 on the calibration store "
        f"{cal['l0_before']:.2f} -> {cal['l0_after']:.2f})"
    )
    return cal


def _train(c: DemoConfig, store, out):
    """Step 3: a BatchTopK and a TopK SAE on one stream of the store. Returns (the run's result,
    its TrainConfig, whether the BatchTopK SAE trained under bf16 autocast)."""
    print(
        f"[3/6] training BatchTopK and TopK SAEs (k={c.k}, {c.expansion}x = "
        f"{store.d_model * c.expansion} latents) on one stream of {c.train_tokens:,} tokens"
    )
    common = dict(
        d_in=store.d_model,
        d_sae=store.d_model * c.expansion,
        k=c.k,
        dead_tokens=5 * c.batch_size,
        hook_name=c.hook,
        model_name=store.manifest["model"],
        context_size=store.manifest["seq_len"],
        dataset="bundled",
    )
    cfgs = [SAEConfig(arch="batchtopk", **common), SAEConfig(arch="topk", **common)]
    tc = TrainConfig(
        total_tokens=c.train_tokens,
        batch_size=c.batch_size,
        lr=c.lr,
        warmup_steps=20,
        checkpoint_every=50,
        device=c.device,
    )
    device = c.device or default_device()
    bf16 = tc.uses_autocast(device, cfgs[0])  # the BatchTopK SAE's, the one evaluated
    print(
        f"      learning rate {tc.lr_for(cfgs[0].d_sae):.2e} "
        f"({'--lr' if c.lr else 'default for ' + str(cfgs[0].d_sae) + ' latents'}); "
        f"{'bf16 autocast' if bf16 else 'fp32'} (the default at this size on this {device})"
    )
    return train(store, cfgs, tc, out=out / "train"), tc, bf16
