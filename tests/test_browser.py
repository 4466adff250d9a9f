"""Notebooks 04 and 05 in a real browser: JupyterLab on 127.0.0.1, Debian's chromium driven by
Playwright (the system browser, no download), Run All, then check what a user would see: plotly
figures and ipywidgets rendered, no widget error text or traceback, and widgets driven by the
browser change what is shown (04: a typed θ changes the heat-map, a clicked token lists its latents;
05: typed text is shaded, a clicked neighbour opens). 04 runs first and trains the course SAE into
    the shared run folder; 05 reuses it. Screenshots go to
test-output/."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from notebook_checks import with_checks
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = (
    "04_adaptive_allocation.ipynb",
    "05_feature_explorer.ipynb",
    "06_beyond_reconstruction.ipynb",
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BAD_TEXT = (
    "Error displaying widget",
    "Error rendering",
    "Traceback (most recent call last)",
    "model not found",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:  # each with its check as a last cell, which prints "ok"
        nbformat.write(with_checks(name), root / name)
    # every cell in the DOM (JupyterLab 4 renders only the visible ones by default)
    settings = root / ".settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    # no "get notified about Jupyter news?" toast over the notebook
    news = root / ".settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings")}
    port = _free_port()
    log = open(root / "jupyter.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--allow-root",
            "--no-browser",
            "--ip",
            "127.0.0.1",
            f"--port={port}",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError as err:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"JupyterLab did not start: {(root / 'jupyter.log').read_text()[-3000:]}"
                ) from err
            time.sleep(0.5)
    yield url, root
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _output_text(page) -> str:
    return page.locator(".jp-OutputArea-output").all_inner_texts()


IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
# a code cell's prompt reads "[*]:" once queued or running and "[n]:" once run; "[ ]:" before
STARTED_JS = (
    "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
    ".some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))"
)


def _run_all(page, attempts: int = 6) -> None:
    """Run > Run All Cells until the first cell is queued. JupyterLab shows the notebook idle before
    its kernel is attached, and a Run All issued in that window runs nothing (seen once in CI: every
    prompt stayed "[ ]"); nothing ran, so asking again is safe. A dialog JupyterLab raised meanwhile
    (its kernel picker) is answered with its default button; one raised just after that check covers
    the menu (a click waited out its 120 s on a loaded machine), so each click has a short
    timeout and the round starts again."""
    for _ in range(attempts):
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        try:
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click(timeout=15_000)
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click(timeout=15_000)
            page.wait_for_function(STARTED_JS, timeout=30_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    raise AssertionError(
        f"Run All Cells started no cell in {attempts} tries: the kernel never attached"
    )


PROMPTS_JS = (
    "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => "
    "e.textContent.trim())"
)
# Run All of either notebook here shows a change (a prompt or an output) at least every 8 s; 180 s
# with none is a lost run
STALL_S = 180


def _kernel_states(url: str) -> list[str]:
    """What the Jupyter server says its kernels are doing ("idle", "busy", "starting", "dead"), for
    a failure's message only: after a restart it says "idle" while a cell runs."""
    try:
        with urllib.request.urlopen(f"{url}/api/kernels", timeout=5) as r:
            return [k.get("execution_state", "?") for k in json.load(r)]
    except OSError as e:
        return [f"unreachable ({e})"]


def _diagnosis(page, lab) -> str:
    url, root = lab
    log = (root / "jupyter.log").read_text(errors="replace")
    shutil.copy(root / "jupyter.log", OUT_DIR / "jupyter.log")
    return (
        f"prompts {page.evaluate(PROMPTS_JS)}; kernels {_kernel_states(url)}; "
        f"outputs {_output_text(page)[-3:]}; jupyter.log ends:\n{log[-3000:]}"
    )


def _reload_restart_and_run_all(page, url: str, name: str) -> None:
    """Open the notebook afresh (a new connection to its kernel), Kernel > Restart Kernel and Run
    All Cells, and confirm."""
    page.goto(f"{url}/lab/tree/{name}?reset")
    try:
        page.wait_for_selector(IDLE, timeout=60_000)
    except PlaywrightTimeout:
        pass  # a wedged kernel may never show idle: the restart is what should mend it
    page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").first.click(timeout=15_000)
    page.locator(".lm-Menu-itemLabel", has_text="Restart Kernel and Run All Cells").first.click(
        timeout=15_000
    )
    page.locator(".jp-Dialog .jp-mod-accept").first.click(timeout=30_000)
    page.wait_for_function(STARTED_JS, timeout=60_000)


def _open_and_run(page, lab, name: str, shot: str) -> None:
    """Open a notebook, Run All, and wait for its last cell's "ok" (a traceback or widget error
    fails at once). Two ways a Run All was seen to get lost, each once in CI, are retried, since
    nothing had run: every prompt stays "[ ]" with the kernel idle (Run All again), or the page
    shows no change at all for 20 minutes (no output ever came): after STALL_S of no change, open
    the notebook afresh and restart its kernel, twice at most. A failure says what the prompts,
    the server's kernels and its log showed."""
    url = lab[0]
    page.goto(f"{url}/lab/tree/{name}?reset")  # ?reset: a fresh workspace with this notebook alone
    page.wait_for_selector(IDLE)
    _run_all(page)
    deadline = time.time() + 1200
    last = page.locator(".jp-CodeCell").last
    shown, changed, restarts = None, time.time(), 0
    while True:
        if any(
            t.strip().endswith("ok")
            for t in last.locator(".jp-OutputArea-output").all_inner_texts()
        ):
            break
        bad = [t for t in _output_text(page) if any(b in t for b in BAD_TEXT)]
        if bad or time.time() > deadline:
            page.screenshot(path=str(OUT_DIR / f"{shot}_failed.png"))
        assert not bad, f"{name}: an output shows an error:\n{bad[0][-3000:]}"
        assert time.time() < deadline, (
            f"{name}: Run All did not finish in time; {_diagnosis(page, lab)}"
        )
        page.wait_for_timeout(2000)
        if not page.evaluate(STARTED_JS) and page.locator(IDLE).count():
            _run_all(page)  # nothing queued, nothing run, kernel idle
        now = (page.evaluate(PROMPTS_JS), _output_text(page))
        if now != shown:
            shown, changed = now, time.time()
        elif time.time() - changed > STALL_S:
            page.screenshot(path=str(OUT_DIR / f"{shot}_stalled{restarts}.png"))
            assert restarts < 2, (
                f"{name}: no change in {STALL_S} s after {restarts} restarts; "
                f"{_diagnosis(page, lab)}"
            )
            print(f"{name}: no change in {STALL_S} s, restarting: {_diagnosis(page, lab)}")
            _reload_restart_and_run_all(page, url, name)
            last = page.locator(".jp-CodeCell").last
            shown, changed, restarts = None, time.time(), restarts + 1
    page.wait_for_selector(IDLE)
    assert not [t for t in _output_text(page) if any(b in t for b in BAD_TEXT)]


def _not_blank(path: Path) -> None:
    from PIL import Image

    colours = Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, f"{path.name} is (nearly) blank"


OUT_DIR = ROOT / "test-output"


@pytest.fixture(scope="module")
def browser_page(lab):
    assert Path(CHROMIUM).exists(), (
        "chromium is missing: `make test` installs it (apt-get install chromium)"
    )
    OUT_DIR.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        yield page, lab
        browser.close()


def test_notebook_04_runs_and_renders_in_jupyterlab(browser_page):
    page, lab = browser_page
    _open_and_run(page, lab, NOTEBOOKS[0], "notebook04")
    plots = page.locator(".js-plotly-plot")
    widgets = page.locator(".jupyter-widgets")
    assert plots.count() >= 4, f"only {plots.count()} plotly figures rendered"
    assert widgets.count() >= 1 and page.locator(".widget-slider").count() >= 1

    # the explorer: its slider readout is editable in ipywidgets 8; type a new θ and press Enter
    explorer = page.locator(".widget-vbox", has=page.locator(".widget-textarea")).last
    figure = explorer.locator(".js-plotly-plot").first
    figure.scroll_into_view_if_needed()
    z_before = figure.evaluate("el => JSON.stringify(el.data[0].z)")
    summary_before = explorer.locator(".widget-html").first.inner_text()
    readout = explorer.locator(".widget-slider .widget-readout").first
    old = float(readout.inner_text())
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(f"{old / 3:.3f}")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "([el, before]) => JSON.stringify(el.data[0].z) !== before",
        arg=[figure.element_handle(), z_before],
        timeout=60_000,
    )
    # the summary is set after the figure, in a later widget message: wait for it too (a CI run read
    # it in between and saw the old text)
    expect(explorer.locator(".widget-html").first).not_to_have_text(summary_before, timeout=30_000)
    # click a token of the heat-map (second row, fourth cell): its active latents appear as buttons
    box = figure.locator(".nsewdrag").first.bounding_box()
    n_rows = figure.evaluate("el => el.data[0].z.length")
    page.mouse.click(
        box["x"] + box["width"] * (3.5 / 16), box["y"] + box["height"] * (1.5 / n_rows)
    )
    latent_button = explorer.locator(".widget-button", has_text="%").first
    expect(latent_button).to_be_visible(timeout=60_000)
    expect(explorer.locator(".widget-html", has_text="(position").first).to_contain_text(
        "(position 19)"
    )
    explorer.screenshot(path=str(OUT_DIR / "notebook04_explorer.png"))
    page.screenshot(path=str(OUT_DIR / "notebook04.png"))
    _not_blank(OUT_DIR / "notebook04_explorer.png")


def test_notebook_05_dashboard_responds_in_jupyterlab(browser_page):
    page, lab = browser_page
    _open_and_run(page, lab, NOTEBOOKS[1], "notebook05")
    assert page.locator(".js-plotly-plot").count() >= 4
    explorer = page.locator(
        ".widget-vbox", has=page.locator("input[placeholder^='type text']")
    ).first
    explorer.scroll_into_view_if_needed()
    # type a hypothesis: the typed text comes back shaded by the latent's activation
    probe = explorer.locator("input[placeholder^='type text']")
    shaded = explorer.locator(".widget-html", has=page.locator("span[title]")).filter(
        has_text="shading relative"
    )
    before = shaded.first.inner_html() if shaded.count() else ""
    probe.click()
    probe.fill("The king of Egypt went out to war")
    probe.press("Enter")
    expect(explorer.locator(".widget-html", has_text="shading relative").first).to_contain_text(
        "Egypt", timeout=60_000
    )
    after = explorer.locator(".widget-html", has_text="shading relative").first.inner_html()
    assert after != before and after.count("<span") >= 6
    # click a neighbour: the dashboard opens that latent
    title = explorer.locator("h3", has_text="Latent").first
    shown = title.inner_text()
    neighbour = explorer.locator(".widget-button", has_text="#").first
    target = neighbour.inner_text().split()[0].lstrip("#")
    neighbour.click()
    expect(title).to_contain_text(f"Latent {target}", timeout=60_000)
    assert title.inner_text() != shown or shown.startswith(f"Latent {target}")
    assert not [t for t in _output_text(page) if any(b in t for b in BAD_TEXT)]
    explorer.screenshot(path=str(OUT_DIR / "notebook05_explorer.png"))
    page.screenshot(path=str(OUT_DIR / "notebook05.png"))
    _not_blank(OUT_DIR / "notebook05_explorer.png")


def test_notebook_06_absorption_explorer_opens_latents_in_jupyterlab(browser_page):
    page, lab = browser_page
    _open_and_run(page, lab, NOTEBOOKS[2], "notebook06")
    assert page.locator(".js-plotly-plot").count() >= 4  # toy, per letter, probing, L0
    explorer = page.locator(".widget-vbox", has=page.locator("text=main latents")).first
    explorer.scroll_into_view_if_needed()
    main = explorer.locator(".widget-button", has_text="#").first
    target = main.inner_text().split()[0].lstrip("#")
    main.click()  # the letter's main latent opens in the feature dashboard below
    title = page.locator("h3", has_text="Latent").first
    expect(title).to_contain_text(f"Latent {target}", timeout=60_000)
    assert not [t for t in _output_text(page) if any(b in t for b in BAD_TEXT)]
    explorer.screenshot(path=str(OUT_DIR / "notebook06_explorer.png"))
    _not_blank(OUT_DIR / "notebook06_explorer.png")
