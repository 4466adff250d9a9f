"""Every notebook runs top to bottom on its defaults, then its check (tests/notebook_checks.py)
asserts on what it computed in its own kernel; none is committed with outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from notebook_checks import CHECKS, printed, with_checks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# 04 and 05 run top to bottom in JupyterLab in a real browser (tests/test_browser.py: Run All, then
# their checks print "ok"), so they are not executed a second time here
BROWSER_RUN = {
    "04_adaptive_allocation.ipynb",
    "05_feature_explorer.ipynb",
    "06_beyond_reconstruction.ipynb",
}


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    assert BROWSER_RUN <= {p.name for p in NOTEBOOKS}
    assert set(CHECKS) == {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_end_in_what_they_teach_not_in_asserts(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[-1].cell_type == "markdown", f"{path.name} ends in code"
    code = "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "assert " not in code, f"{path.name} asserts: its checks belong in notebook_checks.py"


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
    nb = with_checks(path.name)
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
    assert printed(nb).rstrip().endswith("ok")


def test_the_series_in_another_order_shares_one_course_sae(tmp_path):
    """Any order works: 04 first trains the course SAE (and its TopK companion) into the shared run
    folder; 02 then reuses it and shows its saved curves in the training monitor; 05 explores it.
    Each passes its check."""
    for name in (
        "04_adaptive_allocation.ipynb",
        "02_capture_and_train.ipynb",
        "05_feature_explorer.ipynb",
    ):
        nb = with_checks(name)
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
        assert not errors, (name, errors)
        assert printed(nb).rstrip().endswith("ok"), name
    trained = [p for p in tmp_path.rglob("cfg.json") if "checkpoints" not in p.parts]
    assert len([p for p in trained if "batchtopk" in p.parent.name]) == 1, trained


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
