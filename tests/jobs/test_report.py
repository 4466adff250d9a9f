"""The static report: every figure in one self-contained page, rendered by a real headless
browser."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import HOOK

from saekit.jobs.report import build_report
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, train

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def report(model, store, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfgs = [
        SAEConfig(
            arch=a, d_in=576, d_sae=1152, k=8, hook_name=HOOK, model_name="SmolLM2-135M-Instruct"
        )
        for a in ("batchtopk", "topk")
    ]
    train(
        store,
        cfgs,
        TrainConfig(total_tokens=4 * 1800, batch_size=256, warmup_steps=2, progress=False),
        out=run / "train",
    )
    shutil.copytree(store.path, run / "store_test")
    return build_report(run, model=model, n_tokens=1500, n_features=3, progress=False)


def test_report_holds_every_figure(report):
    html = report.read_text()
    assert report.name == "report.html"
    # training curves, token counts, L0 distribution, count vs properties, and per latent its
    # activation histogram and logit effects
    assert html.count('class="plotly-graph-div"') == 4 + 2 * 3
    assert html.count("plotly.js v") == 1  # plotly inlined once: works offline
    for heading in (
        "Summary",
        "Training",
        "Adaptive allocation",
        "Per-token L0 distribution",
        "What goes with more latents",
        "Feature dashboards",
    ):
        assert f"<h2>{heading}" in html
    assert "BatchTopK (batchtopk_k8_1152)" in html and "TopK (topk_k8_1152)" in html
    assert html.count("<h3 id='latent-") == 3 and html.count("of its firings</h5>") >= 3
    assert "nearest by decoder cosine: <a href='#latent-" in html and "fires together with:" in html
    assert html.count('<span title="') > 100  # every context token shaded, its value on hover


def test_report_dashboards_for_chosen_latents(report, model):
    from saekit.sae import load_sae

    run = report.parent
    sae = load_sae(run / "train" / "batchtopk_k8_1152")
    out = build_report(run, model=model, n_tokens=1500, latents=[3, 17], progress=False)
    html = out.read_text()
    assert (
        "<h3 id='latent-3'>" in html
        and "<h3 id='latent-17'>" in html
        and html.count("<h3 id='latent-") == 2
    )
    assert "training tokens" in html and "L0 (dashed: the target)" in html  # the training curves
    with pytest.raises(ValueError, match="out of range.*1152 latents"):
        build_report(run, model=model, n_tokens=1500, latents=[sae.cfg.d_sae], progress=False)


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, (
        "Debian's chromium is missing: `make test` installs it (apt-get install chromium, as root)"
    )
    OUTPUT.mkdir(exist_ok=True)
    png = OUTPUT / "report.png"
    png.unlink(missing_ok=True)
    r = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2400",
            "--virtual-time-budget=15000",
            f"--screenshot={png}",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert png.exists(), r.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] >= 2000 and img.shape[1] >= 1100
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 200, f"screenshot looks blank ({colours} colours)"
    # the heatmap's colour scale (YlOrRd) is on the page: plotly drew the figures, not just the text
    reds = ((img[..., 0] > 200) & (img[..., 1] < 150) & (img[..., 2] < 100)).sum()
    assert reds > 500, reds


def test_report_adds_saebench_results_when_a_bench_ran(report, model, tmp_path):
    import html as H

    from saekit.bench import AbsorptionConfig, ProbingConfig, bench

    run = shutil.copytree(report.parent, tmp_path / "run")
    dirs = sorted(p for p in (run / "train").iterdir() if (p / "cfg.json").exists())
    small = dict(
        absorption_config=AbsorptionConfig(max_words=520, min_words_per_letter=5),
        probing_config=ProbingConfig(context_length=64, contexts_per_document=1),
    )
    bench(dirs, ["absorption", "sparse-probing"], out=run / "bench", progress=False, **small)
    page = build_report(run, model=model, n_tokens=1500, n_features=3, progress=False)
    html = page.read_text()
    for heading in ("SAEBench's evaluations", "First-letter absorption", "Sparse probing"):
        assert f"<h2>{H.escape(heading)}" in html
    assert html.count('class="plotly-graph-div"') == 4 + 2 * 3 + 2
    assert "batchtopk_k8_1152" in html and "topk_k8_1152" in html and "</table>" in html
