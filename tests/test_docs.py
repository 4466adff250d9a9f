"""The documentation site builds with `mkdocs build --strict` (no broken link, no missing reference,
no docstring the API reference cannot read), and holds the pages it promises: the design note, the
API from the docstrings and every notebook rendered without being run."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _nav_files(entries) -> list[str]:
    files = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def test_the_site_builds_strictly_with_every_page(tmp_path):
    site = tmp_path / "site"
    # run from tmp_path: mkdocs-jupyter keeps its cache under the working folder
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = _nav_files(config["nav"])
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages <= set(listed), f"pages missing from the nav: {pages - set(listed)}"
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(Path(f).name for f in listed if f.endswith(".ipynb")) == notebooks
    for page in listed:
        html = site / Path(page).with_suffix("") / "index.html"
        if page == "index.md":
            html = site / "index.html"
        assert html.exists(), page

    reference = (site / "api" / "reference" / "index.html").read_text()
    assert 'id="saekit.sae.reference.batch_topk"' in reference
    sae = (site / "api" / "sae" / "index.html").read_text()
    assert 'id="saekit.sae.architectures.BatchTopKSAE"' in sae
    rendered = (site / "notebooks" / "01_sae_concepts" / "index.html").read_text()
    assert "superposition" in rendered and "Traceback" not in rendered
    design = (site / "design" / "index.html").read_text()
    assert "fast" in design and "reference" in design


def _figures():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import figures
    finally:
        sys.path.pop(0)
    return figures


def test_every_page_shows_the_figures_the_results_files_hold(tmp_path):
    figures = _figures()
    for page in figures.PAGES:
        text = (ROOT / page).read_text()
        assert figures.START in text, f"{page} has no figures block"
        fix = "run python benchmarks/figures.py --write"
        assert text == figures.with_table(text, page), f"{page}'s figures are stale: {fix}"
    # a figure changed in its results file shows in the table
    demo = (figures.RESULTS / "demo_cpu.txt").read_text()
    (tmp_path / "demo_cpu.txt").write_text(demo.replace("CE recovered 0.", "CE recovered 0.1", 1))
    figures.RESULTS, real = tmp_path, figures.RESULTS
    try:
        for name in ("train_step_cpu.txt", "peers_cpu.txt", "capture_cpu.txt"):
            (tmp_path / name).write_text((real / name).read_text())
        for gpu in real.glob("gpu-*.md"):
            (tmp_path / gpu.name).write_text(gpu.read_text())
        assert "CE recovered 0.1" in figures.table()
    finally:
        figures.RESULTS = real


# what a path named in prose must look like to be checked: a top-level folder, then a file with an
# extension or a folder ending in "/"
_TOP = ("saekit", "tests", "benchmarks", "docs", "notebooks", "results", "data", "etc", ".ci")
_EXTENSIONS = "py|md|txt|json|ipynb|csv|sh|yml|toml|html|parquet"
# not after ":" either: `git show COMMIT:path` names a file of that commit
_FOLDERS = "|".join(re.escape(t) for t in _TOP)
_PATH = re.compile(rf"(?<![\w/.:-])((?:{_FOLDERS})/[\w./-]*(?:\.(?:{_EXTENSIONS})\b|/))")
_PLACEHOLDER = re.compile(r"[A-Z]{3,}")  # benchmarks/results/gpu-DATE.json stands for many files
# records of what was: each names the scripts and files of its day
_HISTORY = {"benchmarks/results/HISTORY.md"}
# the wheel's own layout (pyproject.toml maps files into it), not the repository's
_IN_WHEEL = "saekit/_data/"


def named_paths(text: str) -> set[str]:
    return {m.group(1) for m in _PATH.finditer(text) if not _PLACEHOLDER.search(m.group(1))}


def test_every_repository_path_named_in_code_and_docs_exists():
    sources = [
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "results").rglob("*.md"),
    ]
    for d in ("saekit", "tests", "benchmarks", "notebooks"):
        sources += [p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".ipynb", ".sh")]
    missing = [
        f"{src.relative_to(ROOT)}: {path}"
        for src in sources
        if src.relative_to(ROOT).as_posix() not in _HISTORY and src != Path(__file__)
        for path in sorted(named_paths(src.read_text()))
        if not path.startswith(_IN_WHEEL) and not (ROOT / path).exists()
    ]
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


def test_the_path_check_sees_a_moved_file():
    found = named_paths(
        "see tests/test_reference.py and saekit/sae/ (not saekit.sae, benchmarks/gpu-DATE.md "
        "or 1623ebf:benchmarks/crossover.py)"
    )
    assert found == {"tests/test_reference.py", "saekit/sae/"}
    assert not (ROOT / "tests/test_reference.py").exists()


# a measured figure: a decimal number, not part of a version (0.6.0, 3.10+) or an arXiv id
_FIGURE = re.compile(r"(?<![\w.])[-−+]?\d+\.\d+(?![\d.]*\d)(?![+e])")
_ARXIV = re.compile(r"\d{4}\.\d{4,5}")
_CODE = re.compile(r"`[^`\n]*`")
_CITED = re.compile(r"(?<![\w/])(?:benchmarks/results|results)/[\w./-]*\w")
_SOURCE_SUFFIXES = (".txt", ".md", ".json", ".csv")


_NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


@functools.cache
def _figures_in(path: Path) -> frozenset[str]:
    """Every number of a results file as it could be quoted: as written, and rounded to 1-6
    decimals (a table's 0.99689 is quoted as 0.997)."""
    out = set()
    for n in _NUMBER.findall(path.read_text().replace("−", "-")):
        out.add(n.lstrip("-"))
        value = abs(float(n))
        out |= {f"{value:.{d}f}" for d in range(1, 7)}
    return frozenset(out)


def unquoted_figures(page_text: str) -> list[tuple[str, str]]:
    """(figure, paragraph) for every figure of a page that none of the results files (or folders)
    its paragraph names holds, as written or rounded: a figure is quoted from the results, never
    typed from memory. The generated figures block (benchmarks/figures.py) is skipped."""
    text = re.sub(r"<!-- figures:.*?<!-- figures: end -->", "", page_text, flags=re.S)
    missing = []
    # a paragraph, a list item or a table row: the unit that names its sources
    for para in re.split(r"\n\s*\n|\n(?=\s{0,3}(?:[-*|]|\d+\.) )", text):
        figures = [f for f in _FIGURE.findall(_CODE.sub("", para)) if not _ARXIV.fullmatch(f)]
        if not figures:
            continue
        cited = [ROOT / c for c in _CITED.findall(para) if (ROOT / c).exists()]
        files = [f for c in cited for f in ([c] if c.is_file() else sorted(c.rglob("*")))]
        held = set().union(*(_figures_in(f) for f in files if f.suffix in _SOURCE_SUFFIXES))
        missing += [(f, para[:80]) for f in figures if f.lstrip("+-−") not in held]
    return missing


def test_every_figure_in_the_docs_is_quoted_from_a_results_file_it_names():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = {p.name: m for p in pages if (m := unquoted_figures(p.read_text()))}
    assert not missing, f"figures their paragraph's results files do not hold: {missing}"


def test_the_figure_check_sees_a_retyped_figure():
    quoted = "NMSE 0.0231 (results/smollm2_l15/differences.md)."
    assert unquoted_figures(quoted) == []
    retyped = quoted.replace("0.0231", "0.0232")
    assert unquoted_figures(retyped) == [("0.0232", retyped)]
    assert unquoted_figures("version 0.6.0, python 3.10+, arXiv 2412.06410, `lr=0.5`") == []
