"""The documentation site builds with `mkdocs build --strict` (no broken link, no missing reference,
no docstring the API reference cannot read), and holds the pages it promises: the design note, the
API from the docstrings and every notebook rendered without being run."""

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
