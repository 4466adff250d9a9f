"""The notebook series, shipped inside the package: `saekit notebooks DIR` copies it out to work
in."""

from __future__ import annotations

import shutil
from pathlib import Path


def notebooks_source() -> Path:
    """Where this install keeps the series: inside the package (a wheel) or next to it (a
    checkout)."""
    here = Path(__file__).resolve().parents[1]  # the saekit package
    for p in (here / "_data" / "notebooks", here.parent / "notebooks"):
        if p.is_dir() and any(p.glob("*.ipynb")):
            return p
    raise FileNotFoundError("the notebooks are missing from this install; reinstall saekit")


def copy_notebooks(dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy every notebook of the series into dest (created if needed). A notebook already there is
    kept unless overwrite=True, so nobody's edits are lost; the error names the files and the
    flag."""
    from ..plumbing.files import refuse_overlap

    dest = Path(dest)
    refuse_overlap(dest, {"notebook series of this install": notebooks_source()}, "folder")
    src = sorted(notebooks_source().glob("*.ipynb"))
    clash = [dest / p.name for p in src if (dest / p.name).exists()]
    if clash and not overwrite:
        raise FileExistsError(
            f"{', '.join(str(c) for c in clash)} already exist; pass --overwrite to replace them "
            f"or choose another folder"
        )
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in src:
        tmp = dest / f".{p.name}.tmp"
        shutil.copyfile(p, tmp)
        tmp.replace(dest / p.name)  # atomic: a notebook is there whole or not at all
        out.append(dest / p.name)
    return out
