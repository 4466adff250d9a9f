"""Every notebook runs top to bottom on its defaults (its last cells assert on what it computed),
and none is committed with outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# 04 and 05 run top to bottom in JupyterLab in a real browser (tests/test_browser.py: Run All, their
# last cells' assertions print "ok"), so they are not executed a second time here
BROWSER_RUN = {"04_adaptive_allocation.ipynb", "05_feature_explorer.ipynb"}


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    assert BROWSER_RUN <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name} has outputs: strip them"
            )


@pytest.mark.parametrize(
    "path", [p for p in NOTEBOOKS if p.name not in BROWSER_RUN], ids=lambda p: p.name
)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    # run from a scratch folder so RUN_DIR lands in tmp; the notebook imports the installed saekit
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    mimes = {
        m for c in nb.cells if c.cell_type == "code" for o in c.outputs for m in o.get("data", {})
    }
    assert "application/vnd.plotly.v1+json" in mimes, "no plotly figure was produced"
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors


def test_02_reuses_a_course_sae_trained_before_it(tmp_path):
    """Any order works: 04 (or an earlier run of 02) trains the course SAE into the shared run
    folder; 02 then reuses it, shows its saved curves in the training monitor and passes its
    checks."""
    path = ROOT / "notebooks" / "02_capture_and_train.ipynb"
    for run in ("first", "again"):
        nb = nbformat.read(path, as_version=4)
        NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        errors = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if o.output_type == "error"
        ]
        assert not errors, (run, errors)
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert printed.rstrip().endswith("ok")


def test_jupyterlab_opens_without_the_news_pop_up():
    """`make lab` installs etc/jupyterlab-overrides.json where JupyterLab reads its overrides; every
    setting it names exists in the installed JupyterLab with a value its schema allows."""
    import json
    import re
    import sys

    from jupyterlab.commands import get_app_dir

    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"LAB_SETTINGS := \$\(VENV\)/(\S+)", makefile).group(1)
    assert Path(get_app_dir()) / "settings" / "overrides.json" == Path(sys.prefix) / target
    overrides = json.loads((ROOT / "etc" / "jupyterlab-overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    for plugin, values in overrides.items():
        package, name = plugin.split(":")
        schema = json.loads(
            (Path(get_app_dir()) / "schemas" / package / f"{name}.json").read_text()
        )
        for key, value in values.items():
            spec = schema["properties"][key]
            allowed = [c["const"] for c in spec.get("oneOf", [])]
            assert (
                (value in allowed)
                if allowed
                else isinstance(value, {"boolean": bool, "string": str}[spec["type"]])
            )
