"""The house rules: no import circle, small modules, architectures that carry their own facts, a CLI
whose choices and defaults are the library's."""

import ast
import dataclasses
import importlib
import sys
from pathlib import Path

import pytest
import torch

import saekit
from saekit.sae import ARCHITECTURES, SAE, SAEConfig, Selection, load_sae, make_sae, register
from saekit.sae.config import SAEConfigError

PKG = Path(saekit.__file__).parent
MAX_LINES = 400


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """saekit modules that `path` imports anywhere (module level or inside functions)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("saekit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("saekit"):
                continue
            for a in node.names:  # `from . import x` imports the submodule x
                sub = f"{mod}.{a.name}"
                out.add(
                    sub
                    if (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                    or (PKG.parent / sub.replace(".", "/") / "__init__.py").exists()
                    else mod
                )
    return out - {me}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ that imports its submodules runs them (parent -> child): counted, so that
    # a loop through a package (saekit -> interop -> sae -> sae.formats -> saekit) is seen
    edges = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    # a module importing saekit.x.y also runs saekit.x's __init__: count that edge too
    for m, deps in list(edges.items()):
        for d in list(deps):
            parts = d.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in graph and not m.startswith(parent + ".") and m != parent:
                    edges[m].add(parent)
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_saekit_import_resolves():
    """Imports inside functions too (they run late, so a wrong one fails only when that code
    runs)."""
    graph = _graph()
    bad = {m: sorted(d for d in deps if d not in graph) for m, deps in graph.items()}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"imports of modules that do not exist: {bad}"


# the speed layer's callers: the trainer, its step recorder, and SAE.training_loss (users' entry)
FAST_CALLERS = {"saekit.train.trainer", "saekit.train.graphs", "saekit.sae.base"}


def test_only_the_trainer_reaches_into_the_speed_layer():
    """Hints, plans and read-backs stay inside saekit.sae.fast: no architecture, no other module
    imports from it, and where it is imported it is imported as `fast`."""
    graph = _graph()
    reach = {
        m
        for m, deps in graph.items()
        if not m.startswith("saekit.sae.fast")
        and any(d.startswith("saekit.sae.fast") for d in deps)
    }
    assert reach <= FAST_CALLERS, (
        f"modules that import the speed layer: {sorted(reach - FAST_CALLERS)}"
    )
    aliases = {
        a.asname
        for path in PKG.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom | ast.Import)
        for a in node.names
        if a.asname and (a.name == "fast" or a.name.endswith(".fast"))
    }
    assert not aliases, f"the speed layer imported under other names: {aliases}"


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The checker itself: two modules that import each other are reported."""
    a, b = tmp_path / "saekit" / "a.py", tmp_path / "saekit" / "b.py"
    a.parent.mkdir()
    a.write_text("from . import b\n")
    b.write_text("def f():\n    from .a import g\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "saekit")
    assert _imports(a) == {"saekit.b"} and _imports(b) == {"saekit.a"}
    with pytest.raises(AssertionError, match="saekit.a -> saekit.b -> saekit.a"):
        test_no_import_cycles()


MAX_FUNCTION_LINES = 60  # a screen


def test_no_function_is_longer_than_a_screen():
    """Every function of saekit fits a screen; a longer one says why in a comment on its first
    line (`# longer: <reason>`)."""
    long = []
    for path in PKG.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES and "# longer:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({size})")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines: {long}"


def test_modules_stay_small():
    big = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): {big}"


# the package root: the library's public entry points; the rest lives in a package per concept
ROOT_MODULES = {
    "__init__",
    "__main__",
    "analysis",
    "calibrate",
    "distributed",
    "features",
    "interop",
    "models",
    "toy",
}
# tests of the whole project stay at the root of tests/; the rest mirror the package
WHOLE_PROJECT_TESTS = {
    "test_benchmarks",
    "test_browser",
    "test_demo",
    "test_docs",
    "test_layout",
    "test_notebooks",
    "test_readme",
    "test_style",
    "test_wheel",
}


def test_the_package_root_holds_the_public_entry_points():
    assert {p.stem for p in PKG.glob("*.py")} == ROOT_MODULES
    for name in ("saekit.sae", "saekit.train", "saekit.analysis", "saekit.models"):
        assert importlib.import_module(name).__name__ == name  # imports users write keep working
    from saekit.activations import ActivationStore, capture, open_store  # noqa: F401


def test_tests_at_the_root_are_the_whole_projects_or_a_root_modules():
    here = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    stray = here - WHOLE_PROJECT_TESTS - {f"test_{m}" for m in ROOT_MODULES}
    assert not stray, f"move these into the tests/ folder of the package they test: {stray}"


def test_test_files_stay_small_and_mirror_the_package():
    tests = Path(__file__).parent
    big = {
        str(p.relative_to(tests)): n
        for p in tests.rglob("test_*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"test files over {MAX_LINES} lines (split them by what they test): {big}"
    folders = {p.parent.relative_to(tests) for p in tests.rglob("test_*.py")} - {Path(".")}
    stray = [str(f) for f in folders if not (PKG / f).is_dir()]
    assert folders and not stray, f"tests/ folders with no saekit package of that name: {stray}"


def test_every_architecture_states_its_facts():
    for name, cls in ARCHITECTURES.items():
        assert cls.arch == name and cls.label and cls.color.startswith("#")
        assert cls.saelens_name in ("standard", "topk", "jumprelu") and cls.saelens_training_name
        cfg = SAEConfig(arch=name, d_in=8, d_sae=32, k=4)
        sae = make_sae(cfg)
        assert sae.has_theta == hasattr(sae, "calibrate_threshold") == (sae.modes[0] == "threshold")
        assert sae.has_prefixes == hasattr(sae, "prefixes")
        assert cfg.name == f"{name}_{cls.sparsity_label(cfg)}_32"
        sel = sae.select(torch.relu(torch.randn(16, 32)), "train")
        assert isinstance(sel, Selection) and sel.rows.shape == sel.cols.shape
        assert (sel.cut is not None) == sae.has_theta  # the cut is returned, not left on the object
        assert not any(k.startswith("_last") for k in vars(sae))


class _HalfReLU(SAE):
    """A test architecture: ReLU with every pre-activation below 0.5 dropped. Only this class,
    nothing else."""

    arch, label, color = "halfrelu_test", "HalfReLU (test)", "#000000"

    # step: the training step's settings (saekit.sae.Step)
    def select(self, a, mode=None, step=None):
        rows, cols = (a > 0.5).nonzero(as_tuple=True)
        return Selection(rows, cols)


def test_adding_an_architecture_is_one_class(tmp_path):
    """A class registered in a test trains, evaluates, saves, loads, sweeps and appears in the
    CLI and plots."""
    from saekit.cli import build_parser
    from saekit.jobs.sweep import sweep_configs
    from saekit.metrics import reconstruction_metrics
    from saekit.train import TrainConfig, train
    from saekit.viz import arch_color, arch_label

    register(_HalfReLU)
    try:
        x = torch.randn(2048, 16)
        cfgs = sweep_configs(16, ["halfrelu_test", "topk"], [4], expansion=4, normalize="none")
        assert [c.arch for c in cfgs] == ["halfrelu_test", "topk"]
        res = train(
            x,
            cfgs,
            TrainConfig(total_tokens=2048, batch_size=256, warmup_steps=1, progress=False),
            out=tmp_path,
        )
        assert res.steps == 8 and res.logs[0]["nmse"].iloc[-1] < 1
        back = load_sae(tmp_path / res.names[0])
        assert type(back) is _HalfReLU
        torch.testing.assert_close(back.encode(x[:64]), res.saes[0].encode(x[:64]))
        assert reconstruction_metrics(back, [x[:512]])["l0"] > 0
        args = build_parser().parse_args(
            ["train", "--store", "s", "--out", "o", "--arch", "halfrelu_test"]
        )
        assert args.arch == ["halfrelu_test"]
        assert (
            arch_label("halfrelu_test") == "HalfReLU (test)"
            and arch_color("halfrelu_test") == "#000000"
        )
    finally:
        ARCHITECTURES.pop("halfrelu_test")
    with pytest.raises(
        SAEConfigError, match="unknown architecture 'halfrelu_test'; choose one of batchtopk"
    ):
        SAEConfig(arch="halfrelu_test")


def _actions(parser):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):  # subcommands
            for name, sub in action.choices.items():
                yield from ((f"{name} {a.dest}", a) for a in sub._actions if a.dest != "help")


def test_every_cli_flag_has_help_and_shows_its_default():
    from saekit.cli import build_parser

    p = build_parser()
    missing = [name for name, a in _actions(p) if not a.help]
    assert not missing, f"flags without help: {missing}"
    text = p._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 4096)" in text and "(default: token)" in text


def test_cli_defaults_are_the_librarys():
    from saekit.cli import build_parser
    from saekit.jobs.demo import DemoConfig
    from saekit.metrics import evaluate
    from saekit.sae import ARCHS
    from saekit.train import TrainConfig

    p = build_parser()
    t = p.parse_args(["train", "--store", "s", "--out", "o"])
    tc = TrainConfig()
    assert (t.batch_size, t.lr, t.warmup_steps, t.seed) == (
        tc.batch_size,
        tc.lr,
        tc.warmup_steps,
        tc.seed,
    )
    assert (t.normalize, t.enc_init_norm) == (SAEConfig.normalize, SAEConfig.enc_init_norm)
    arch = next(a for n, a in _actions(p) if n == "train arch")
    assert tuple(arch.choices) == ARCHS
    e = p.parse_args(["eval", "sae", "--store", "s"])
    assert (e.tokens, e.ce_tokens) == (20_000, __import__("saekit.metrics").metrics.CE_TOKENS)
    assert e.tokens == __import__("inspect").signature(evaluate).parameters["n_tokens"].default
    d = p.parse_args(["demo"])
    assert all(getattr(d, f.name) == f.default for f in dataclasses.fields(DemoConfig))


def test_importing_the_sae_package_stays_light():
    """`import saekit.sae` (to load or use an SAE) pulls in neither training, capture nor the
    peers' bridges."""
    import subprocess

    code = (
        "import sys, saekit.sae; print(' '.join(m for m in sys.modules if m.startswith('saekit')))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "saekit.sae.architectures" in loaded
    heavy = {
        m
        for m in loaded
        if m.split(".")[1:2]
        in (["train"], ["activations"], ["interop"], ["metrics"], ["models"], ["cli"])
    }
    assert not heavy, heavy


def test_the_project_speaks_of_itself_only():
    """No project file speaks of the working periods it was developed in; a date or a commit says
    when instead (the bundled corpus is the one text where the word is its authors')."""
    import re

    root = PKG.parent
    # spelled apart: this file is checked too
    word = re.compile(r"\b" + "sess" + r"ions?\b", re.IGNORECASE)
    places = [root / "README.md", root / "Makefile", root / "pyproject.toml"]
    for folder in ("saekit", "tests", "docs", "benchmarks", "results", "notebooks"):
        places += [
            p
            for p in (root / folder).rglob("*")
            if p.suffix in (".py", ".md", ".txt", ".ipynb", ".json")
        ]
    found = [
        f"{p.relative_to(root)}:{i}"
        for p in places
        if p.exists()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if word.search(line) and 'scope="session"' not in line
    ]
    assert not found, f"lines that name a working period instead of a date or commit: {found[:10]}"
