"""The figures draw what they are given: one trace per architecture or SAE with its own values, the
intervals as error bars, seeds averaged with bars spanning every seed, budgets marked, gaps left
empty, and each architecture in its own colour."""

import numpy as np
import pandas as pd
import pytest

from saekit import viz
from saekit.sae import ARCHITECTURES


def _sweep(seeds=(0,)):
    rows = []
    for seed in seeds:
        for arch, shift in (("batchtopk", 0.0), ("topk", 0.01)):
            for k, nmse in ((16, 0.10), (32, 0.07), (64, 0.05)):
                value = nmse + shift + 0.002 * seed
                rows.append(
                    dict(
                        name=f"{arch}_k{k}",
                        architecture=arch,
                        seed=seed,
                        l0=float(k),
                        nmse=value,
                        nmse_lo=value - 0.001,
                        nmse_hi=value + 0.002,
                        ce_recovered=0.99 - value / 10,
                        dead_fraction=0.0,
                    )
                )
    return pd.DataFrame(rows)


def test_the_frontier_draws_each_architecture_with_its_intervals():
    fig = viz.frontier_figure(_sweep())
    nmse = [t for t in fig.data if t.xaxis == "x"]
    assert [t.name for t in nmse] == ["BatchTopK", "TopK"]
    assert list(nmse[1].y) == pytest.approx([0.11, 0.08, 0.06])
    assert list(nmse[0].error_y.array) == pytest.approx([0.002] * 3)
    assert list(nmse[0].error_y.arrayminus) == pytest.approx([0.001] * 3)
    assert nmse[0].line.color == ARCHITECTURES["batchtopk"].color
    assert len(fig.data) == 4  # and a CE-recovered panel of the same two lines
    assert fig.layout.xaxis.type == "log"


def test_seeds_are_averaged_and_the_bars_span_every_seed():
    means = viz.seed_means(_sweep(seeds=(0, 1, 2)))
    row = means.set_index("name").loc["topk_k32"]
    assert row["nmse"] == pytest.approx(0.082) and row["n_seeds"] == 3
    assert row["nmse_lo"] == pytest.approx(0.079) and row["nmse_hi"] == pytest.approx(0.086)
    fig = viz.frontier_figure(_sweep(seeds=(0, 1, 2)))
    assert len(fig.data[0].x) == 3  # one point per setting, not per seed


def test_per_token_l0_histograms_are_shares_with_the_budget_marked():
    counts = {"BatchTopK": np.array([0, 2, 2, 6]), "TopK": np.array([4, 4, 4, 4])}
    fig = viz.l0_distribution_figure(counts, k=4)
    assert [t.histnorm for t in fig.data] == ["percent", "percent"]
    assert list(fig.data[1].x) == [4, 4, 4, 4]
    assert "mean 2.5" in fig.layout.annotations[0].text
    lines = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(lines) == 2 and {s.x0 for s in lines} == {4}


def test_token_counts_leave_tokens_without_a_code_empty():
    table = pd.DataFrame(
        dict(
            token=["<s>", "The", " king", "\n"],
            count=[0, 3, 7, 1],
            kept=[False, True, True, True],
            top_latents=[[], [(5, 1.0)], [(9, 2.0)], [(1, 0.5)]],
        )
    )
    fig = viz.token_counts_figure({"BatchTopK": table}, width=3)
    z = fig.data[0].z
    assert [list(r) for r in z] == [[None, 3, 7], [1, None, None]]
    assert fig.data[0].zmax == 7
    assert fig.data[0].text[0][2] == "·king" and fig.data[0].text[1][0] == "⏎"


def test_training_curves_show_every_panel_and_the_target():
    log = pd.DataFrame(
        dict(tokens=[1024, 2048], loss=[1.0, 0.5], nmse=[0.5, 0.2], l0=[40, 33], dead_frac=[0, 0.1])
    )
    fig = viz.training_curves_figure(
        {"batchtopk_k32_4608": log}, targets={"batchtopk_k32_4608": 32}
    )
    assert len(fig.data) == len(viz.TRAINING_PANELS)
    assert list(fig.data[2].y) == [40, 33]
    assert [s.y0 for s in fig.layout.shapes] == [32]
    assert fig.layout.yaxis.type == "log"


def test_matryoshka_prefixes_are_drawn_by_width():
    prefixes = [
        dict(groups=1, width=288, nmse=0.3, l0=20.0, ce_recovered=0.9),
        dict(groups=2, width=4608, nmse=0.1, l0=32.0, ce_recovered=0.98),
    ]
    fig = viz.prefix_figure(prefixes)
    assert list(fig.data[0].x) == [288, 4608] and list(fig.data[1].y) == [0.9, 0.98]


def test_superposition_and_cosine_figures_take_the_toy_tables():
    from saekit.toy import superposition_table

    table = superposition_table(d=16, features_per_dim=(1, 4), active=(1, 3), n_samples=200)
    fig = viz.superposition_figure(table)
    assert len(fig.data) == 1 + 2 * table["active"].nunique()
    assert list(fig.data[0].x) == [1, 4]
    hist = viz.cosine_histogram_figure({"random": [0.1, 0.2], "decoder": [0.9]})
    assert [t.name for t in hist.data] == ["random", "decoder"]
    assert hist.layout.barmode == "overlay"


def test_labels_and_colours_are_the_architectures_own():
    for name, cls in ARCHITECTURES.items():
        assert viz.arch_label(name) == cls.label and viz.arch_color(name) == cls.color
    assert viz.arch_label("mystery") == "mystery" and viz.arch_color("mystery") is None
    assert len({cls.color for cls in ARCHITECTURES.values()}) == len(ARCHITECTURES)
