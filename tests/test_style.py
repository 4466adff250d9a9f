"""The code style is checked, not hoped for: ruff format and ruff check (settings in pyproject.toml)
pass on the package, the tests and the benchmarks, no message or docstring is cut into short
pieces, and each check fails on code that breaks its rule."""

import io
import itertools
import subprocess
import sys
import tokenize
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


# a reflow that cut a sentence leaves a piece this short ('the ' / 'manifest's'): rejoin it
SHORT_PIECE = 12


def _literals(source: str):
    """Each string literal's source text with its first line, in order, and whether only blank
    lines or comments lie between it and the previous one (an implicit concatenation)."""
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    lines = source.splitlines(keepends=True)
    offsets = [0, *itertools.accumulate(len(line) for line in lines)]
    at = lambda pos: offsets[pos[0] - 1] + pos[1]
    depth, start, joined = 0, None, False
    for t in toks:
        name = tokenize.tok_name[t.type]
        if name == "FSTRING_START":  # Python 3.12 splits an f-string into tokens
            depth += 1
            start = start if depth > 1 else t
        elif name == "FSTRING_END":
            depth -= 1
            if depth == 0:
                yield source[at(start.start) : at(t.end)], start.start[0], joined
                joined = True
        elif depth:
            continue
        elif t.type == tokenize.STRING:
            yield t.string, t.start[0], joined
            joined = True
        elif t.type not in (tokenize.NL, tokenize.COMMENT):
            joined = False


def _body(literal: str) -> str:
    quote = min(i for i in (literal.find('"'), literal.find("'")) if i >= 0)
    width = 3 if literal[quote : quote + 3] in ('"""', "'''") else 1
    return literal[quote + width : len(literal) - width]


def short_pieces(path: Path) -> list[str]:
    """Implicit string concatenations in `path` holding a piece of SHORT_PIECE characters or
    fewer: 'FILE:LINE: PIECE'."""
    found, group = [], []
    for literal, line, joined in [*_literals(path.read_text()), ("", 0, False)]:
        if not joined:
            short = [(n, lit) for lit, n in group if len(_body(lit)) <= SHORT_PIECE]
            if len(group) > 1 and short:
                found.append(f"{path}:{short[0][0]}: {short[0][1]}")
            group = []
        group.append((literal, line))
    return found


def test_no_sentence_is_cut_into_short_pieces():
    files = [p for d in ("saekit", "tests", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    found = [f for p in files for f in short_pieces(p)]
    assert not found, "rejoin these pieces:\n" + "\n".join(found)


def test_the_piece_check_finds_a_cut_sentence(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        'x = (\n    f"a message that runs on and then the "\n    "manifest\'s"\n)\ny = "ok"\n'
    )
    assert short_pieces(bad) == [f'{bad}:3: "manifest\'s"']
    bad.write_text(
        'x = (\n    "a whole first part of the sentence, "\n    "and a whole second part"\n)\n'
    )
    assert short_pieces(bad) == []
