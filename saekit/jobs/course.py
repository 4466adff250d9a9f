"""The notebook series as a course: one shared run folder whose stores and BatchTopK SAE notebook 02
makes and notebooks 04 and 05 reuse (whichever runs first trains it, once), and the `SAE = None |
"folder" | "release/sae_id"` choice of every notebook's parameter cell.

    RUN_DIR/store_train, RUN_DIR/store_test   the captured train and held-out text (capture_splits)
    RUN_DIR/train/<name>/                     the course's BatchTopK SAE (train() reuses a finished
    run) RUN_DIR/sae_<slug>/store_*                stores for an SAE given by the user, at its own
    model and hook
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..activations import capture_splits, saekit_hook_name
from ..sae import SAE, SAEConfig, architecture
from ..train import TrainConfig, train


@dataclass(frozen=True)
class Sizes:
    """How much each mode captures and trains. small: minutes on a laptop CPU; full: a GPU-sized
    run."""

    train_tokens: int  # captured training tokens
    held_out_tokens: int
    epochs: int  # passes over the training store
    k: int
    expansion: int  # latents per input dimension
    batch: int


SIZES = {
    "small": Sizes(24_000, 4_000, 3, 32, 4, 1024),
    "full": Sizes(500_000, 25_000, 3, 32, 8, 4096),
}


def sizes(mode: str) -> Sizes:
    if mode not in SIZES:
        raise ValueError(f"MODE must be one of {', '.join(SIZES)}, not {mode!r}")
    return SIZES[mode]


def stores(model, hook: str, run_dir: str | Path, mode: str = "small"):
    """(train store, held-out store) of the shared run: captured once, reused after (same text,
    same files)."""
    s = sizes(mode)
    return capture_splits(model, hook, Path(run_dir), s.train_tokens, s.held_out_tokens)


def sae_config(store, hook: str, mode: str = "small") -> tuple[SAEConfig, TrainConfig]:
    """The course's BatchTopK SAE and its training settings for a store."""
    s = sizes(mode)
    cfg = SAEConfig(
        arch="batchtopk",
        d_in=store.d_model,
        d_sae=s.expansion * store.d_model,
        k=s.k,
        dead_tokens=5 * s.batch,
        hook_name=hook,
        model_name=store.manifest["model"],
    )
    return cfg, TrainConfig(
        total_tokens=s.epochs * s.train_tokens,
        batch_size=s.batch,
        warmup_steps=10,
        checkpoint_every=25,
    )


def trained_sae(model, hook: str, run_dir: str | Path, mode: str = "small", callback=None):
    """(SAE, train store, held-out store): the course SAE, trained into RUN_DIR/train unless it
    is there already."""
    store, held = stores(model, hook, run_dir, mode)
    cfg, tc = sae_config(store, hook, mode)
    return (
        train(store, cfg, tc, out=Path(run_dir) / "train", callback=callback).saes[0],
        store,
        held,
    )


def load_choice(spec: str | Path | None) -> SAE | None:
    """A notebook's SAE parameter: None (train the course SAE), a local folder (saekit, SAELens or
    sparsify), or a SAELens pretrained release as "release/sae_id" (needs the Hugging Face hub;
    offline, the error says so and how to use a downloaded folder instead)."""
    if spec is None:
        return None
    from ..interop import load

    return load(spec)


def model_name_for(sae: SAE) -> str | None:
    """The model an SAE was trained on, as a transformers id (models.transformers_name)."""
    from ..models import transformers_name

    return transformers_name(sae.cfg.model_name)


def model_and_hook(chosen: SAE | None, model_name: str | None, hook: str) -> tuple[str | None, str]:
    """The model and hook a notebook works at: its parameters, or those the chosen SAE was
    trained at."""
    if chosen is None:
        return model_name, hook
    return model_name or model_name_for(chosen), saekit_hook_name(chosen.cfg.hook_name)


def topk_companion(
    store, hook: str, run_dir: str | Path, mode: str = "small", k: int | None = None
) -> SAE:
    """A TopK SAE with the course SAE's size and k, trained on the same store into
    RUN_DIR/train_topk (once)."""
    return companion(store, hook, run_dir, mode, "topk", k)


def companion(
    store, hook: str, run_dir: str | Path, mode: str = "small", arch: str = "topk", k=None
) -> SAE:
    """An SAE of another architecture with the course SAE's size and sparsity (k, or JumpReLU's
    target L0), trained on the same store into RUN_DIR/train_ARCH (once)."""
    cfg, tc = sae_config(store, hook, mode)
    level = k or cfg.k
    fields = {**cfg.to_dict(), "arch": arch, **architecture(arch).sweep_setting(level)}
    return train(store, SAEConfig.from_dict(fields), tc, out=companion_dir(run_dir, arch)).saes[0]


def companion_dir(run_dir: str | Path, arch: str) -> Path:
    """Where companion() trains an architecture's SAE (the course SAE itself: RUN_DIR/train)."""
    return Path(run_dir) / ("train" if arch == "batchtopk" else f"train_{arch}")


def bench_configs(mode: str = "small"):
    """saekit bench's absorption and sparse-probing settings for the course: fewer words and
    contexts in the small mode, SAEBench's sizes in the full one."""
    from ..bench import AbsorptionConfig, ProbingConfig

    if sizes(mode) == SIZES["full"]:
        return AbsorptionConfig(), ProbingConfig()
    return AbsorptionConfig(max_words=1040, min_words_per_letter=10), ProbingConfig(
        contexts_per_document=1
    )


def evaluated_row(sae: SAE, model, held, name: str, ce_tokens: int = 1024) -> dict:
    """A sweep-table row (saekit.jobs.sweep.sweep_row) for an SAE trained elsewhere, evaluated on
    `held`."""
    from ..metrics import evaluate
    from .sweep import sweep_row

    m = evaluate(sae, model, held, ce_tokens=ce_tokens, progress=False)
    return sweep_row(name, sae, m, train_tokens=0, train_seconds=0.0, train_cfg=TrainConfig())


def run_dir_for(run_dir: str | Path, spec) -> Path:
    """Where a notebook keeps its stores: the shared run folder, or a folder of its own for a
    chosen SAE."""
    if spec is None:
        return Path(run_dir)
    return Path(run_dir) / ("sae_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(spec)).strip("_")[-60:])


def course_sae(
    spec=None,
    run_dir: str | Path = "runs/course",
    mode: str = "small",
    model_name: str | None = None,
    hook: str = "resid_post.15",
    callback=None,
):
    """(SAE, model, train store, held-out store) for a notebook: the course SAE (spec None; trained
    once into the shared run folder), or the SAE the user chose with the model it was trained on
    and stores at its hook."""
    from ..models import load_model

    chosen = load_choice(spec)
    if chosen is None:
        model = load_model(model_name)
        sae, store, held = trained_sae(model, hook, run_dir, mode, callback)
        return sae, model, store, held
    model_name, hook = model_and_hook(chosen, model_name, hook)
    model = load_model(model_name)
    store, held = stores(model, hook, run_dir_for(run_dir, spec), mode)
    return chosen, model, store, held
