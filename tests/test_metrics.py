import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import HOOK, split_sae
from saekit.metrics import SCHEMA, ce_metrics, cosine, evaluate, fvu, l0_histogram, nmse, reconstruction_metrics
from saekit.sae import make_sae


def test_metric_values_on_hand_computed_examples():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]])
    # errors: 1 + 0 + 1 = 2; ||x||^2 = 1 + 4 + 9 = 14; mean (4/3, 2/3): sum ||x - mean||^2 = 42/9 + 24/9 = 22/3
    assert nmse(x, x_hat) == pytest.approx(2 / 14)
    assert fvu(x, x_hat) == pytest.approx(2 / (22 / 3))
    assert cosine(x, x_hat) == pytest.approx((1 / math.sqrt(2) + 1 + 1) / 3)
    h = l0_histogram(torch.tensor([0, 2, 2, 5]))
    assert h["count"] == [0, 1, 2, 3, 4, 5] and h["tokens"] == [1, 0, 2, 0, 0, 1]


def test_streamed_metrics_equal_whole_batch_metrics():
    torch.manual_seed(0)
    sae = make_sae(arch="relu", d_in=8, d_sae=32, normalize="none")
    x = torch.randn(300, 8)
    m = reconstruction_metrics(sae, x.split(64))
    with torch.no_grad():
        z, x_hat = sae(x)
    assert m["nmse"] == pytest.approx(nmse(x, x_hat), rel=1e-5)
    assert m["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-5)
    assert m["l0"] == pytest.approx(float((z != 0).sum(-1).float().mean()))
    density = (z != 0).float().mean(0)
    assert m["dead_fraction"] == pytest.approx(float((density == 0).float().mean()))
    assert m["dense_fraction"] == pytest.approx(float((density > 0.1).float().mean()))


def identity_sae(d):
    """relu(x) - relu(-x) = x: a ReLU SAE with W_enc = [I, -I] reconstructs perfectly."""
    return split_sae("relu", d)


def zero_sae(d):
    sae = make_sae(arch="relu", d_in=d, d_sae=8, normalize="none", hook_name=HOOK)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.fixture(scope="module")
def seqs(store):
    pos = store.positions()
    keep = store.keep_mask()
    assert keep.sum() == len(pos) and keep[pos[:, 0], pos[:, 1]].all()
    return np.array(store.tokens[:4]), keep[:4]


def test_perfect_reconstruction_recovers_all_ce(model, seqs):
    m = ce_metrics(identity_sae(576), model, *seqs)
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert m["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["kl"] == pytest.approx(0.0, abs=1e-4)
    assert m["ce_zero_ablation"] > m["ce_clean"] + 0.5


def test_zero_reconstruction_recovers_nothing_against_zero_ablation(model, seqs):
    m = ce_metrics(zero_sae(576), model, *seqs)
    assert m["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_sae"] == pytest.approx(m["ce_zero_ablation"], abs=1e-6)
    assert m["kl"] > 0.1


def test_spliced_reconstruction_plus_error_reproduces_clean(model, seqs, store):
    torch.manual_seed(0)
    sae = make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval()
    m = ce_metrics(sae, model, *seqs)
    assert m["ce_sae_plus_error"] == pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["kl_sae_plus_error"] == pytest.approx(0.0, abs=1e-4)
    assert m["ce_sae"] > m["ce_clean"]  # an untrained SAE hurts


def test_several_saes_share_the_ce_baselines_and_match_one_at_a_time(model, seqs):
    from saekit.metrics import ce_metrics_many

    torch.manual_seed(0)
    saes = [identity_sae(576), zero_sae(576), make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval()]
    many = ce_metrics_many(saes, model, *seqs, error_splice=[True, False, True])
    for sae, m in zip(saes, many):
        one = ce_metrics(sae, model, *seqs)
        for key in ("ce_clean", "ce_sae", "ce_zero_ablation", "ce_mean_ablation", "ce_recovered", "kl"):
            assert m[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert many[1]["ce_sae_plus_error"] is None and many[2]["ce_sae_plus_error"] == pytest.approx(many[2]["ce_clean"], abs=1e-4)
    assert [m["ce_recovered"] for m in many][:2] == [pytest.approx(1.0, abs=1e-4), pytest.approx(0.0, abs=1e-6)]


def test_evaluate_json_schema(model, store):
    torch.manual_seed(0)
    sae = make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval()
    m = evaluate(sae, model, store, n_tokens=500, ce_tokens=100)
    json.dumps(m)  # JSON-able
    assert m["schema"] == SCHEMA and set(m) == {"schema", "sae", "mode", "n_tokens", "n_sequences", "reconstruction",
                                                 "sparsity", "downstream", "intervals", "interval_method", "per_sequence"}
    assert set(m["reconstruction"]) == {"nmse", "mse_normalized", "fvu", "explained_variance", "cosine"}
    assert set(m["sparsity"]) == {"l0", "l0_std", "l0_quantiles", "l0_histogram", "dead_fraction", "dense_fraction"}
    assert set(m["downstream"]) == {"n_tokens", "n_sequences", "ce_clean", "ce_sae", "ce_zero_ablation",
                                    "ce_mean_ablation", "ce_recovered", "ce_recovered_mean", "ce_delta", "kl",
                                    "ce_sae_plus_error", "kl_sae_plus_error", "intervals"}
    assert set(m["intervals"]) == {"nmse", "mse_normalized", "l0", "ce_recovered", "ce_recovered_mean", "ce_delta", "kl"}
    for name, (lo, hi) in m["intervals"].items():  # each interval holds its point estimate
        point = m["downstream"].get(name, m["reconstruction"].get(name, m["sparsity"].get(name)))
        assert lo <= point <= hi, name
    assert m["n_tokens"] == 500 and m["sparsity"]["l0"] == pytest.approx(8.0) and m["downstream"]["n_tokens"] >= 100
    assert sum(m["per_sequence"]["recon"]["n"]) == 500 and sum(m["per_sequence"]["ce"]["n"]) == m["downstream"]["n_tokens"]
    no_model = evaluate(sae, None, store.path, n_tokens=500)
    assert no_model["downstream"] is None and no_model["reconstruction"] == m["reconstruction"]


def test_evaluation_samples_sequences_from_the_whole_store(store):
    from saekit.metrics import sample_sequences

    pos = store.positions()
    keep = np.zeros(store.tokens.shape, dtype=bool)
    keep[pos[:, 0], pos[:, 1]] = True
    n_seq = keep.shape[0]
    chosen = sample_sequences(keep, 300)
    assert keep[chosen].sum() >= 300 and keep[chosen[:-1]].sum() < 300 + keep.sum(1).max()
    assert chosen.max() > n_seq // 2 and chosen.min() < n_seq // 2  # not the first sequences only
    assert (sample_sequences(keep, 300) == chosen).all() and not np.array_equal(sample_sequences(keep, 300, seed=1), chosen)
    assert len(sample_sequences(keep, 10 ** 9)) == n_seq


def test_perfect_sae_interval_is_exactly_one_and_intervals_narrow_with_more_tokens(model, store):
    from saekit.metrics import ce_metrics_many, paired_difference

    pos = store.positions()
    keep = np.zeros(store.tokens.shape, dtype=bool)
    keep[pos[:, 0], pos[:, 1]] = True
    tokens = np.array(store.tokens)
    torch.manual_seed(0)
    rough = make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval()
    perfect, few = ce_metrics_many([identity_sae(576), rough], model, tokens[:6], keep[:6], hook=HOOK)
    assert perfect["intervals"]["ce_recovered"] == [1.0, 1.0] and perfect["intervals"]["ce_recovered_mean"] == [1.0, 1.0]
    many = ce_metrics_many([rough], model, tokens, keep, hook=HOOK)[0]
    width = lambda m: m["intervals"]["ce_recovered"][1] - m["intervals"]["ce_recovered"][0]
    assert many["n_sequences"] > 4 * few["n_sequences"] and 0 < width(many) < width(few)
    # a paired difference of an SAE with itself is exactly zero; against the perfect SAE it excludes zero
    as_eval = lambda m: {"per_sequence": {"ce": m["_per_sequence"]}}
    same = paired_difference(as_eval(few), as_eval(few), "ce_recovered")
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and not same["excludes_zero"]
    d = paired_difference(as_eval(perfect), as_eval(few), "ce_recovered")
    assert d["excludes_zero"] and d["interval"][0] > 0 and d["difference"] == pytest.approx(1 - few["ce_recovered"])


def test_batchtopk_evaluation_does_not_depend_on_batch_size(store):
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train

    res = train(store, SAEConfig(arch="batchtopk", d_in=576, d_sae=1152, k=8, hook_name=store.hook), TrainConfig(
        total_tokens=4000, batch_size=256, warmup_steps=2, progress=False))
    sae = res.saes[0]
    x = store.load()[:1024]
    a = reconstruction_metrics(sae, x.split(1024))
    b = reconstruction_metrics(sae, x.split(37))
    assert a["l0"] == pytest.approx(b["l0"]) and a["nmse"] == pytest.approx(b["nmse"], rel=1e-5)
    c = reconstruction_metrics(sae, x.split(1024), mode="batch")
    d = reconstruction_metrics(sae, x.split(37), mode="batch")
    assert c["l0"] == pytest.approx(8.0) and c["nmse"] != pytest.approx(d["nmse"], rel=1e-6)
    # several (SAE, mode) pairs in one pass give each pair's own figures
    from saekit.metrics.reconstruction import reconstruction_metrics_many

    both = reconstruction_metrics_many([(sae, None), (sae, "batch")], x.split(37))
    assert [m["nmse"] for m in both] == [b["nmse"], d["nmse"]] and [m["l0"] for m in both] == [b["l0"], d["l0"]]
    # evaluate() reads the store once for threshold and batch mode (it read it twice before)
    reads = []
    take = type(store).take
    store.take = lambda rows, hook=None: reads.append(len(rows)) or take(store, rows, hook)
    try:
        m = evaluate(sae, None, store, n_tokens=1000, batch_size=400)
    finally:
        del store.take
    assert reads == [400, 400, 200] and m["sparsity"]["l0_batch_mode"] > 0
    assert m["sparsity"]["l0_threshold_over_batch"] == pytest.approx(m["sparsity"]["l0"] / m["sparsity"]["l0_batch_mode"])


def test_small_sweep_end_to_end(model, store, tmp_path):
    from saekit.sweep import COLUMNS, load_sweep, sweep, sweep_configs
    from saekit.train import TrainConfig
    from saekit.viz import frontier_figure

    cfgs = sweep_configs(576, ("batchtopk", "topk", "jumprelu", "matryoshka"), (8, 16), expansion=2, hook_name=HOOK)
    tc = TrainConfig(total_tokens=2 * 1800, batch_size=256, warmup_steps=2, progress=False)
    df = sweep(store, cfgs, tc, tmp_path / "sw", model=model, eval_tokens=600, ce_tokens=150, hook=HOOK, progress=False)
    assert list(df.columns[:len(COLUMNS)]) == COLUMNS and len(df) == 8
    assert set(df.architecture) == {"batchtopk", "topk", "jumprelu", "matryoshka"}
    mat = json.loads((tmp_path / "sw" / "matryoshka_k8_1152" / "eval.json").read_text())
    assert [p["width"] for p in mat["prefixes"]] == [72, 144, 288, 576, 1152]
    assert mat["prefixes"][-1]["nmse"] == pytest.approx(mat["reconstruction"]["nmse"], rel=1e-6)
    assert all(p["ce_recovered"] is not None for p in mat["prefixes"])
    # a finished sweep of the same SAEs and budget is loaded, not recomputed
    import saekit.sweep as sweep_mod

    def no_training(*a, **k):
        raise AssertionError("trained again")

    orig, sweep_mod.train = sweep_mod.train, no_training
    try:
        pd.testing.assert_frame_equal(sweep(store, cfgs, tc, tmp_path / "sw", model=model, hook=HOOK), df)
        with pytest.raises(AssertionError, match="trained again"):  # a different budget is a different sweep
            sweep(store, cfgs, TrainConfig(total_tokens=4 * 1800, batch_size=256, progress=False), tmp_path / "sw",
                  model=model, hook=HOOK)
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
    assert names == {"BatchTopK", "TopK", "JumpReLU", "Matryoshka BatchTopK"} and len(fig.data) == 8  # arch x panel
    xs = [list(t.x) for t in fig.data]
    assert all(x == sorted(x) for x in xs)
    # the results-folder report: tables per SAE and per k, the frontier, and the Matryoshka prefixes
    from saekit.sweep import prefix_table
    from saekit.cli import main as cli

    prefixes = prefix_table(tmp_path / "sw")
    assert set(prefixes.name) == {"matryoshka_k8_1152", "matryoshka_k16_1152"} and len(prefixes) == 10
    assert cli(["sweep-report", str(tmp_path / "sw"), "--out", str(tmp_path / "res")]) == 0
    by_k = (tmp_path / "res" / "by_k.md").read_text().splitlines()
    assert by_k[0].startswith("| architecture | setting | seeds | l0 | nmse") and len(by_k) == 2 + len(df)
    assert "| batchtopk | k=8 | 1 |" in by_k[2]
    diffs = (tmp_path / "res" / "differences.md").read_text()
    assert diffs.count("nmse batchtopk \u2212 topk") == 2 and diffs.count("ce_recovered batchtopk \u2212 topk") == 2
    assert diffs.count("nmse batchtopk \u2212 jumprelu") == 2 and diffs.count("nmse batchtopk \u2212 matryoshka") == 2
    for col in ("nmse_lo", "nmse_hi", "ce_recovered_lo", "ce_recovered_hi", "kl_lo", "kl_hi"):
        assert (df[col.rsplit("_", 1)[0]].between(df[f"{col.rsplit('_', 1)[0]}_lo"], df[f"{col.rsplit('_', 1)[0]}_hi"])).all()
    assert fig.data[0].error_y.array is not None  # the frontier carries the intervals
    for f in ("sweep.csv", "sweep.md", "frontier.html", "prefixes.csv", "prefixes.md", "prefixes.html"):
        assert (tmp_path / "res" / f).stat().st_size > 0


def test_committed_results_load():
    from saekit.sweep import committed_results

    df = committed_results("smollm2_l15")
    assert {"name", "architecture", "k", "d_sae", "l0", "nmse", "ce_recovered", "kl", "train_tokens"} <= set(df.columns) and {"batchtopk", "topk", "jumprelu"} <= set(df.architecture)
    assert (df.d_sae == df.d_sae.iloc[0]).all() and (df.train_tokens == df.train_tokens.iloc[0]).all()
    with pytest.raises(FileNotFoundError, match="no committed results named 'nope'"):
        committed_results("nope")


def test_per_token_l0_matches_a_constructed_sae(store):
    from saekit.metrics import per_token_l0

    x = store.rows(0, 300, HOOK).float()
    counts = per_token_l0(split_sae("batchtopk", threshold=0.5), store, n_tokens=300)
    assert (counts == (x.abs() > 0.5).sum(-1).numpy()).all()
