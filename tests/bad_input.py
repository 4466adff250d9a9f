"""What the bad-input suite shares: the CLI run as a subprocess, the refusal it must give, and
snapshots that show nothing already written changed."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "PYTHONPATH": str(ROOT),
}


def cli(*args, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """`saekit ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "saekit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
        **kwargs,
    )


def run(*args) -> subprocess.CompletedProcess:
    """`saekit ARGS` in this process: what `cli` gives, without a new interpreter's start-up (for
    cases refused before the work)."""
    from saekit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own refusals
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    """Assert the command was refused as the CLI promises (exit code 2, one message, no traceback)
    with a message naming every one of `words`; returns the message."""
    assert r.returncode == 2, (
        f"exit code {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}"
    )
    assert "Traceback" not in r.stderr, r.stderr
    message = r.stderr.strip().splitlines()[-1]
    assert "error:" in message, r.stderr
    for w in words:
        assert w.lower() in r.stderr.lower(), f"{w!r} not in: {r.stderr}"
    return message


def snapshot(*folders: Path) -> dict:
    """Every file under the folders (the writer lock aside) with its size and hash."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file() and not p.name.endswith(".saekit.lock"):
                out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.saekit.lock"))
    return dst


def holding_lock(folder: Path, beside: bool = False) -> subprocess.Popen:
    """Another process that holds `folder`'s writer lock until its stdin closes (returned once it
    holds it)."""
    code = (
        "import sys; from saekit.plumbing.locks import writer_lock\n"
        f"with writer_lock(sys.argv[1], 'capture', beside={beside}):\n"
        "    print('held', flush=True); sys.stdin.read()"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def release(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(timeout=30)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
