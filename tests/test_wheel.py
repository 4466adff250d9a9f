"""The package as a user gets it: a wheel, installed into a fresh virtual environment away from the
checkout, runs the demo on the bundled corpus and embedded model and hands out the notebooks."""

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (whl,) = out.glob("saekit-*.whl")
    return whl


def test_wheel_holds_the_package_its_data_and_every_notebook(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {str(p.relative_to(ROOT)) for p in (ROOT / "saekit").rglob("*.py")}
    assert code <= names, sorted(code - names)
    data = {"saekit/_data/corpus.jsonl", "saekit/_data/results/smollm2_l15/sweep.csv"}
    data |= {f"saekit/_data/notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    # a new notebook needs its line in pyproject.toml's force-include
    assert data <= names, sorted(data - names)
    assert not any("/runs/" in n or n.endswith(".pyc") for n in names)


def test_wheel_runs_the_demo_and_gives_out_the_notebooks_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    py = venv / "bin" / "python"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # the dependencies (torch, nnsight, ...) come from this environment, behind the fresh one's own
    # site-packages: saekit itself resolves to the installed wheel, never to the checkout
    fresh_site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (fresh_site / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import saekit; print(saekit.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(fresh_site)), where
    saekit = venv / "bin" / "saekit"
    r = subprocess.run(
        [str(saekit), "notebooks", "nb"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = sorted(p.name for p in (work / "nb").glob("*.ipynb"))
    assert got == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert (work / "nb" / got[0]).read_bytes() == (ROOT / "notebooks" / got[0]).read_bytes()
    again = subprocess.run(
        [str(saekit), "notebooks", "nb"], cwd=work, env=env, capture_output=True, text=True
    )
    # nothing already there is replaced silently
    assert again.returncode == 2 and "--overwrite" in again.stderr
    r = subprocess.run(
        [
            str(saekit),
            "demo",
            "--out",
            "demo",
            "--tokens",
            "6000",
            "--calib-tokens",
            "1500",
            "--eval-tokens",
            "1500",
            "--train-tokens",
            "6144",
            "--batch-size",
            "512",
            "--ce-tokens",
            "256",
            "--k",
            "8",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((work / "demo" / "metrics.json").read_text())
    assert (
        m["train_steps"] == 12
        and m["sparsity"]["l0"] > 0
        and (work / "demo" / "report.html").exists()
    )
