import json

import pandas as pd
import pytest
from conftest import HOOK

from saekit.metrics import (
    SCHEMA,
)


def test_small_sweep_end_to_end(model, store, tmp_path):
    from saekit.jobs.sweep import COLUMNS, load_sweep, sweep, sweep_configs
    from saekit.train import TrainConfig
    from saekit.viz import frontier_figure

    cfgs = sweep_configs(
        576, ("batchtopk", "topk", "jumprelu", "matryoshka"), (8, 16), expansion=2, hook_name=HOOK
    )
    tc = TrainConfig(total_tokens=2 * 1800, batch_size=256, warmup_steps=2, progress=False)
    df = sweep(
        store,
        cfgs,
        tc,
        tmp_path / "sw",
        model=model,
        eval_tokens=600,
        ce_tokens=150,
        hook=HOOK,
        progress=False,
    )
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS and len(df) == 8
    assert set(df.architecture) == {"batchtopk", "topk", "jumprelu", "matryoshka"}
    mat = json.loads((tmp_path / "sw" / "matryoshka_k8_1152" / "eval.json").read_text())
    assert [p["width"] for p in mat["prefixes"]] == [72, 144, 288, 576, 1152]
    assert mat["prefixes"][-1]["nmse"] == pytest.approx(mat["reconstruction"]["nmse"], rel=1e-6)
    assert all(p["ce_recovered"] is not None for p in mat["prefixes"])
    # a finished sweep of the same SAEs and budget is loaded, not recomputed
    import saekit.jobs.sweep as sweep_mod

    def no_training(*a, **k):
        raise AssertionError("trained again")

    orig, sweep_mod.train = sweep_mod.train, no_training
    try:
        pd.testing.assert_frame_equal(
            sweep(store, cfgs, tc, tmp_path / "sw", model=model, hook=HOOK), df
        )
        # a different budget is a different sweep
        with pytest.raises(AssertionError, match="trained again"):
            sweep(
                store,
                cfgs,
                TrainConfig(total_tokens=4 * 1800, batch_size=256, progress=False),
                tmp_path / "sw",
                model=model,
                hook=HOOK,
            )
    finally:
        sweep_mod.train = orig
    topk = df[df.architecture == "topk"].set_index("k")
    assert topk.loc[8, "l0"] == pytest.approx(8) and topk.loc[16, "l0"] == pytest.approx(16)
    assert df.ce_recovered.notna().all() and (df.nmse > 0).all()
    again = load_sweep(tmp_path / "sw")
    pd.testing.assert_frame_equal(again, df, check_dtype=False)
    assert (tmp_path / "sw" / "sweep.csv").exists()
    for name in df.name:
        assert json.loads((tmp_path / "sw" / name / "eval.json").read_text())["schema"] == SCHEMA
    fig = frontier_figure(df)
    names = {t.name for t in fig.data}
    # arch x panel
    assert names == {"BatchTopK", "TopK", "JumpReLU", "Matryoshka BatchTopK"} and len(fig.data) == 8
    xs = [list(t.x) for t in fig.data]
    assert all(x == sorted(x) for x in xs)
    # the results-folder report: tables per SAE and per k, the frontier, and the Matryoshka prefixes
    from saekit.cli import main as cli
    from saekit.jobs.sweep import prefix_table

    prefixes = prefix_table(tmp_path / "sw")
    assert (
        set(prefixes.name) == {"matryoshka_k8_1152", "matryoshka_k16_1152"} and len(prefixes) == 10
    )
    assert cli(["sweep-report", str(tmp_path / "sw"), "--out", str(tmp_path / "res")]) == 0
    by_k = (tmp_path / "res" / "by_k.md").read_text().splitlines()
    assert by_k[0].startswith("| architecture | setting | seeds | l0 | nmse") and len(
        by_k
    ) == 2 + len(df)
    assert "| batchtopk | k=8 | 1 |" in by_k[2]
    diffs = (tmp_path / "res" / "differences.md").read_text()
    assert (
        diffs.count("nmse batchtopk \u2212 topk") == 2
        and diffs.count("ce_recovered batchtopk \u2212 topk") == 2
    )
    assert (
        diffs.count("nmse batchtopk \u2212 jumprelu") == 2
        and diffs.count("nmse batchtopk \u2212 matryoshka") == 2
    )
    for col in ("nmse_lo", "nmse_hi", "ce_recovered_lo", "ce_recovered_hi", "kl_lo", "kl_hi"):
        assert (
            df[col.rsplit("_", 1)[0]].between(
                df[f"{col.rsplit('_', 1)[0]}_lo"], df[f"{col.rsplit('_', 1)[0]}_hi"]
            )
        ).all()
    assert fig.data[0].error_y.array is not None  # the frontier carries the intervals
    for f in (
        "sweep.csv",
        "sweep.md",
        "frontier.html",
        "prefixes.csv",
        "prefixes.md",
        "prefixes.html",
    ):
        assert (tmp_path / "res" / f).stat().st_size > 0


def test_committed_results_load():
    from saekit.jobs.sweep import committed_results

    df = committed_results("smollm2_l15")
    assert {
        "name",
        "architecture",
        "k",
        "d_sae",
        "l0",
        "nmse",
        "ce_recovered",
        "kl",
        "train_tokens",
    } <= set(df.columns) and {"batchtopk", "topk", "jumprelu"} <= set(df.architecture)
    assert (df.d_sae == df.d_sae.iloc[0]).all() and (
        df.train_tokens == df.train_tokens.iloc[0]
    ).all()
    with pytest.raises(FileNotFoundError, match="no committed results named 'nope'"):
        committed_results("nope")
