"""The paper's comparison on the embedded model, with seeds and intervals. Resumable: run it again and every
finished stage is reused, an interrupted one continues from its last checkpoint.

    python results/smollm2_l15/run.py [--stages seed0 seed1 seed2 jumprelu_paper report] [--out runs/smollm2_l15]

SmolLM2-135M-Instruct resid_post.15, bundled corpus (documents in a seeded random order), 4,608 latents (8x),
786,432 training tokens per SAE, every setting at saekit's defaults (learning rate from the dictionary size,
the paper's encoder start). Stages:
  seed0          BatchTopK, TopK, Matryoshka BatchTopK at k = 16/32/64; JumpReLU at target L0 = 16/32/64
  seed1, seed2   BatchTopK and TopK at k = 16/32/64 with other seeds (initialisation and batch order)
  jumprelu_paper JumpReLU as the paper trains it: L0 penalty swept over its coefficient, bandwidth 0.001,
                 thresholds starting at 0.001, no target
  report         the tables and figures into results/smollm2_l15 (saekit sweep-report)
A finished stage's table, each SAE's eval.json (with the per-sequence sums behind its intervals) and cfg.json are
kept under results/smollm2_l15/stages/STAGE (committed; the weights stay in --out), so a later run skips the
stages already done and the report combines them.
Each SAE is evaluated on the held-out split: NMSE (and the paper's normalised MSE), L0, CE recovered and KL on
16,384 positions, each with a 95% bootstrap interval over sequences.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from saekit.activations import capture_splits
from saekit.models import load_model
from saekit.sae import SAEConfig
from saekit.jobs.sweep import sweep, sweep_configs
from saekit.jobs.sweep_report import write_report
from saekit.train import TrainConfig

HOOK, TOKENS, BATCH, EXPANSION = "resid_post.15", 786_432, 1024, 8
L0_COEFFS = (0.5, 2.0, 8.0, 32.0)  # the paper-recipe JumpReLU's penalty sweep
HERE = Path(__file__).resolve().parent
STAGES = HERE / "stages"


def archive(sweep_dir: Path, dest: Path) -> None:
    """Keep what the report needs of a finished stage: its table and each SAE's eval.json and cfg.json."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(sweep_dir / "sweep.csv", tmp / "sweep.csv")
    for ev in sweep_dir.glob("*/eval.json"):
        (tmp / ev.parent.name).mkdir()
        for f in ("eval.json", "cfg.json"):
            shutil.copy(ev.parent / f, tmp / ev.parent.name / f)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def stage_configs(stage: str, d: int, **meta) -> tuple[list[SAEConfig], int]:
    common = dict(dead_tokens=5 * BATCH, **meta)
    if stage == "seed0":
        return sweep_configs(d, ("batchtopk", "topk", "matryoshka", "jumprelu"), (16, 32, 64), EXPANSION, **common), 0
    if stage in ("seed1", "seed2"):
        return sweep_configs(d, ("batchtopk", "topk"), (16, 32, 64), EXPANSION, **common), int(stage[-1])
    if stage == "jumprelu_paper":
        return [SAEConfig(arch="jumprelu", d_in=d, d_sae=d * EXPANSION, l0_coeff=c, target_l0=None,
                          jumprelu_bandwidth=0.001, jumprelu_init_threshold=0.001, **common) for c in L0_COEFFS], 0
    raise SystemExit(f"unknown stage {stage}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", default=["seed0", "seed1", "seed2", "jumprelu_paper", "report"])
    ap.add_argument("--out", default="runs/smollm2_l15")
    a = ap.parse_args(argv)
    out = Path(a.out)
    model = load_model()
    store, held = capture_splits(model, HOOK, out, 600_000, 30_000)  # the whole train split, the whole test split
    meta = dict(hook_name=HOOK, model_name=store.manifest["model"], context_size=store.manifest["seq_len"],
                dataset="bundled")
    for stage in a.stages:
        if stage == "report":
            done = [STAGES / s for s in ("seed0", "seed1", "seed2", "jumprelu_paper") if (STAGES / s / "sweep.csv").exists()]
            write_report(done, HERE)
            continue
        if (STAGES / stage / "sweep.csv").exists():
            print(f"{stage}: done earlier ({STAGES / stage})")
            continue
        cfgs, seed = stage_configs(stage, store.d_model, **meta)
        t0 = time.perf_counter()
        # fp32, as every committed stage was trained (before bf16 became the CPU default): a resumed or
        # added stage trains as the others did
        df = sweep(store, cfgs, TrainConfig(total_tokens=TOKENS, batch_size=BATCH, seed=seed, warmup_steps=50,
                                            checkpoint_every=100, autocast=False), out / stage, eval_data=held,
                   model=model, eval_tokens=len(held), hook=HOOK)
        archive(out / stage, STAGES / stage)
        print(f"{stage}: {len(df)} SAEs, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
