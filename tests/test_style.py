"""The code style is checked, not hoped for: ruff format and ruff check (settings in pyproject.toml)
pass on the package, the tests and the benchmarks, and the same check fails on code that breaks a
rule."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True
    )


def test_the_code_is_formatted_and_passes_ruff_check():
    for args in (("format", "--check"), ("check",)):
        r = _ruff(*args, "saekit", "tests", "benchmarks")
        assert r.returncode == 0, f"ruff {' '.join(args)} failed:\n{r.stdout}{r.stderr}"


def test_the_check_fails_on_a_long_line_and_an_unused_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\nx = '" + "a" * 120 + "'\n")
    r = _ruff("check", "--config", str(ROOT / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert r.returncode == 1 and "E501" in r.stdout and "F401" in r.stdout
    r = _ruff("format", "--check", "--config", str(ROOT / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert r.returncode == 1
