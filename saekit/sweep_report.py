"""Write a sweep's table and frontier figure into a results folder: python -m saekit.sweep_report SWEEP_DIR OUT_DIR"""
import shutil
import sys
from pathlib import Path

from .sweep import load_sweep
from .viz import frontier_figure


def main(sweep_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = load_sweep(sweep_dir)
    shutil.copy(Path(sweep_dir) / "sweep.csv", out / "sweep.csv")
    frontier_figure(df, title="SmolLM2-135M resid_post.15: BatchTopK vs TopK vs JumpReLU").write_html(
        out / "frontier.html", include_plotlyjs=True, full_html=True)
    cols = ["name", "l0", "nmse", "fvu", "ce_recovered", "ce_delta", "kl", "dead_fraction"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.4f}" for v in r) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print(df[cols].to_string(index=False))


if __name__ == "__main__":
    main(*sys.argv[1:3])
