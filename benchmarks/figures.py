"""The current figures, read from the results files: the table in the README and the docs is
written by this script, never typed, so it cannot drift from what was measured.

    python benchmarks/figures.py           print the table
    python benchmarks/figures.py --write   rewrite it between the markers of each page in PAGES

Each figure is the first (newest) run its results file records; tests/test_docs.py checks that every
page holds what this script writes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START = "<!-- figures: written by benchmarks/figures.py from the results files; do not edit -->"
END = "<!-- figures: end -->"
PAGES = ("README.md", "docs/benchmarks.md", "docs/demo.md")


def _find(pattern: str, text: str, where: Path) -> re.Match:
    m = re.search(pattern, text)
    if m is None:
        raise SystemExit(f"{where}: no line matches {pattern!r}; update benchmarks/figures.py")
    return m


def _machine(header: str) -> str:
    m = re.search(r"(AMD EPYC|Intel Xeon|NVIDIA \w+)", header)
    return m.group(1) if m else "machine not named"


def demo() -> tuple[str, str, str]:
    path = RESULTS / "demo_cpu.txt"
    t = path.read_text()
    head = _find(r"at commit (\w+) \((\d{4}-\d\d-\d\d)\), a ([^,]+)", t, path)
    l0 = _find(r"L0 ([\d.]+) \[([\d.]+), ([\d.]+)\]", t, path)
    nmse = _find(r"NMSE ([\d.]+) \[", t, path).group(1)
    ce = _find(r"CE recovered ([\d.]+) \[([\d.]+), ([\d.]+)\]", t, path)
    ratio = _find(r"held-out L0 / k: ([\d.]+) with the trained theta, ([\d.]+) after", t, path)
    secs = _find(r"; (\d+) s in all", t, path).group(1)
    figure = (
        f"L0 {l0[1]} [{l0[2]}, {l0[3]}] with calibrated θ ({ratio[2]} k; {ratio[1]} k with "
        f"training's θ), NMSE {nmse}, CE recovered {ce[1]} [{ce[2]}, {ce[3]}], {secs} s"
    )
    return f"`make demo`, held-out ({head[3]}, {head[2]}, {head[1]})", figure, path.name


def train_step() -> tuple[str, str, str]:
    path = RESULTS / "train_step_cpu.txt"
    t = path.read_text()
    head = _find(r"\((\d{4}-\d\d-\d\d), commit (\w+)[^\n]*", t, path)
    row = r"saekit batchtopk{} +[\d,]+ tok/s +ratio ([\d.]+) \(([\d.]+)-([\d.]+)\)"
    fp32, bf16 = _find(row.format(""), t, path), _find(row.format(" bf16"), t, path)
    what = (
        f"BatchTopK training step vs the plain dense step, CPU, 576 x 4,608, B=1,024 "
        f"({_machine(head[0])}, {head[2]})"
    )
    figure = (
        f"{fp32[1]}x (rounds {fp32[2]}-{fp32[3]}) fp32, {bf16[1]}x ({bf16[2]}-{bf16[3]}) at "
        "the default bf16"
    )
    return what, figure, path.name


def peers() -> tuple[str, str, str]:
    path = RESULTS / "peers_cpu.txt"
    t = path.read_text()
    head = _find(r"\((\d{4}-\d\d-\d\d), commit (\w+)[^\n]*", t, path)
    row = r"{} +[\d,]+ +[\d,]+-[\d,]+ +([\d.]+)x +([\d.]+)"
    ours = _find(row.format(re.escape("saekit BatchTopK (fast)")), t, path)
    sparsify = _find(row.format("sparsify TopK"), t, path)
    saelens = _find(row.format("SAELens BatchTopK"), t, path)
    what = f"vs the peers, 100 steps on the same batches, CPU ({_machine(head[0])}, {head[2]})"
    figure = (
        f"{sparsify[1]}x sparsify, {saelens[1]}x SAELens, at held-out NMSE {ours[2]} "
        f"(sparsify {sparsify[2]}, SAELens {saelens[2]})"
    )
    return what, figure, path.name


def capture() -> tuple[str, str, str]:
    path = RESULTS / "capture_cpu.txt"
    t = path.read_text()
    head = _find(r"\((\d{4}-\d\d-\d\d), Model name: ([^,]+)", t, path)
    ratio = _find(r"capture\(\) end to end: +([\d,]+) kept tokens/s[^=]*= ([\d.]+)x", t, path)
    what = f"capture vs a plain transformers forward stopped at the layer ({head[2]}, {head[1]})"
    return what, f"{ratio[2]}x ({ratio[1]} kept tokens/s)", path.name


def gpu() -> tuple[str, str, str]:
    path = sorted(RESULTS.glob("gpu-????-??-??.md"))[-1]
    t = path.read_text()
    head = _find(r"# saekit on (NVIDIA \w+) \((\d{4}-\d\d-\d\d)", t, path)
    step = _find(r"saekit bf16 autocast \(d=768[^|]*\| ([\d.]+) ms +([\d.]+)x", t, path)
    plain = _find(r"plain fp32 \(d=768[^|]*\| ([\d.]+) ms", t, path)
    vs = _find(r"\| sparsify TopK \| [\d,]+ tok/s \| saekit/this ([\d.]+)x", t, path)
    what = f"GPU step at the paper's size vs plain fp32 ({head[1]}, {head[2]})"
    figure = f"{step[2]}x bf16 ({step[1]} ms vs {plain[1]} ms); vs sparsify {vs[1]}x"
    return what, figure, path.name


def _paired_rows(path: Path) -> list[list[str]]:
    """The rows of a paired-differences table: b, k, seed, metric, difference, lo, hi, excludes."""
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in path.read_text().splitlines()
    ]
    return [r for r in rows if len(r) == 8 and r[0] not in ("b", "---")]


def batchtopk_vs_topk() -> tuple[str, str, str]:
    path = ROOT / "results" / "smollm2_l15" / "differences.md"
    better = {"nmse": -1, "ce_recovered": 1, "kl": -1}  # the sign of a difference BatchTopK wins
    rows = [r for r in _paired_rows(path) if r[0] == "topk" and r[3] in better]
    won = sum(r[7] == "yes" and float(r[4]) * better[r[3]] > 0 for r in rows)
    lost = sum(r[7] == "yes" and float(r[4]) * better[r[3]] < 0 for r in rows)
    seeds = len({r[2] for r in rows})
    ks = "/".join(sorted({r[1] for r in rows}, key=int))
    what = f"BatchTopK vs TopK on the embedded model, k = {ks}, {seeds} seeds"
    figure = (
        f"BatchTopK better on NMSE, CE recovered and KL in {won} of {len(rows)} paired "
        f"intervals, worse in {lost}"
    )
    return what, figure, "results/smollm2_l15/differences.md"


def absorption_and_probing() -> tuple[str, str, str]:
    path = ROOT / "results" / "smollm2_l15" / "bench.md"
    text = path.read_text().split("averaged over the seeds", 1)[-1]
    called = {"absorption": [], "top-1": []}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 9 or not cells[0].isdigit():
            continue
        k, other = cells[0], cells[1]
        for name, value, items, seeds in (("absorption", *cells[3:6]), ("top-1", *cells[6:9])):
            both = [_excludes_zero(items), _excludes_zero(seeds)]
            if all(both):
                called[name].append(f"{other} at k={k} ({float(value):+.3f})")
    figure = "; ".join(
        f"{name}: " + (", ".join(found) if found else "no difference called")
        for name, found in called.items()
    )
    what = "Absorption and top-1 probing, BatchTopK minus each, mean of the seeds, both intervals"
    return what, figure, "results/smollm2_l15/bench.md"


def _excludes_zero(interval: str) -> bool:
    lo, hi = (float(v) for v in interval.strip("[]").split(","))
    return lo > 0 or hi < 0


FIGURES = (demo, train_step, peers, capture, gpu, batchtopk_vs_topk, absorption_and_probing)


def table() -> str:
    """The current figures as one Markdown table."""
    rows = ["| what | figure | results file |", "| --- | --- | --- |"]
    for figure in FIGURES:
        what, value, where = figure()
        shown = where if "/" in where else f"benchmarks/results/{where}"
        rows.append(f"| {what} | {value} | `{shown}` |")
    return "\n".join(rows)


def block() -> str:
    return f"{START}\n{table()}\n{END}"


def with_table(text: str, page: str) -> str:
    """`text` with the block between the markers replaced by the current table."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no figures block (the markers {START!r} ... {END!r})")
    return pattern.sub(lambda _: block(), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the table in every page")
    a = p.parse_args(argv)
    if not a.write:
        print(table())
        return 0
    for page in PAGES:
        path = ROOT / page
        path.write_text(with_table(path.read_text(), page))
        print(f"wrote the figures into {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
