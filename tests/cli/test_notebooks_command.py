"""`saekit notebooks DIR` from the checkout: the series copied whole, nothing overwritten without
the flag."""

from pathlib import Path

import pytest

from saekit.cli import main
from saekit.jobs.notebooks import copy_notebooks, notebooks_source

ROOT = Path(__file__).resolve().parents[2]


def test_notebooks_are_copied_and_never_overwritten_silently(tmp_path, capsys):
    assert notebooks_source().samefile(ROOT / "notebooks")
    assert main(["notebooks", str(tmp_path / "nb")]) == 0
    names = sorted(p.name for p in (tmp_path / "nb").glob("*.ipynb"))
    assert names == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) and len(names) == 6
    mine = tmp_path / "nb" / names[0]
    mine.write_text("my edits")
    assert main(["notebooks", str(tmp_path / "nb")]) == 2
    assert "--overwrite" in capsys.readouterr().err and mine.read_text() == "my edits"
    with pytest.raises(FileExistsError, match=names[0]):
        copy_notebooks(tmp_path / "nb")
    assert main(["notebooks", str(tmp_path / "nb"), "--overwrite"]) == 0
    assert mine.read_bytes() == (ROOT / "notebooks" / names[0]).read_bytes()
    assert not list((tmp_path / "nb").glob(".*.tmp"))
