import json
import math

import numpy as np
import pytest
import torch
from conftest import HOOK, split_sae

from saekit.metrics import (
    SCHEMA,
    ce_metrics,
    cosine,
    evaluate,
    fvu,
    l0_histogram,
    nmse,
    reconstruction_metrics,
)
from saekit.sae import make_sae


def test_metric_values_on_hand_computed_examples():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]])
    # errors: 1 + 0 + 1 = 2; ||x||^2 = 1 + 4 + 9 = 14; mean (4/3, 2/3): sum ||x - mean||^2
    # = 42/9 + 24/9 = 22/3
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
    saes = [
        identity_sae(576),
        zero_sae(576),
        make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval(),
    ]
    many = ce_metrics_many(saes, model, *seqs, error_splice=[True, False, True])
    for sae, m in zip(saes, many):
        one = ce_metrics(sae, model, *seqs)
        for key in (
            "ce_clean",
            "ce_sae",
            "ce_zero_ablation",
            "ce_mean_ablation",
            "ce_recovered",
            "kl",
        ):
            assert m[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert many[1]["ce_sae_plus_error"] is None and many[2]["ce_sae_plus_error"] == pytest.approx(
        many[2]["ce_clean"], abs=1e-4
    )
    assert [m["ce_recovered"] for m in many][:2] == [
        pytest.approx(1.0, abs=1e-4),
        pytest.approx(0.0, abs=1e-6),
    ]


def test_evaluate_json_schema(model, store):
    torch.manual_seed(0)
    sae = make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval()
    m = evaluate(sae, model, store, n_tokens=500, ce_tokens=100)
    json.dumps(m)  # JSON-able
    assert m["schema"] == SCHEMA and set(m) == {
        "schema",
        "sae",
        "mode",
        "n_tokens",
        "n_sequences",
        "reconstruction",
        "sparsity",
        "downstream",
        "intervals",
        "interval_method",
        "per_sequence",
        "data",
    }
    assert m["data"] == {
        "kind": "store",
        "tokens_sha256": store.manifest["tokens_sha256"],
        "model": store.manifest["model"],
        "n_rows": len(store),
        "dtype": "float32",
    }
    assert set(m["reconstruction"]) == {
        "nmse",
        "mse_normalized",
        "fvu",
        "explained_variance",
        "cosine",
    }
    assert set(m["sparsity"]) == {
        "l0",
        "l0_std",
        "l0_quantiles",
        "l0_histogram",
        "dead_fraction",
        "dense_fraction",
    }
    assert set(m["downstream"]) == {
        "n_tokens",
        "n_sequences",
        "ce_clean",
        "ce_sae",
        "ce_zero_ablation",
        "ce_mean_ablation",
        "ce_recovered",
        "ce_recovered_mean",
        "ce_delta",
        "kl",
        "kl_zero_ablation",
        "ce_sae_plus_error",
        "kl_sae_plus_error",
        "intervals",
    }
    assert set(m["intervals"]) == {
        "nmse",
        "mse_normalized",
        "l0",
        "ce_recovered",
        "ce_recovered_mean",
        "ce_delta",
        "kl",
    }
    for name, (lo, hi) in m["intervals"].items():  # each interval holds its point estimate
        point = m["downstream"].get(name, m["reconstruction"].get(name, m["sparsity"].get(name)))
        assert lo <= point <= hi, name
    assert (
        m["n_tokens"] == 500
        and m["sparsity"]["l0"] == pytest.approx(8.0)
        and m["downstream"]["n_tokens"] >= 100
    )
    assert (
        sum(m["per_sequence"]["recon"]["n"]) == 500
        and sum(m["per_sequence"]["ce"]["n"]) == m["downstream"]["n_tokens"]
    )
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
    assert (sample_sequences(keep, 300) == chosen).all() and not np.array_equal(
        sample_sequences(keep, 300, seed=1), chosen
    )
    assert len(sample_sequences(keep, 10**9)) == n_seq


def test_perfect_sae_interval_is_exactly_one_and_intervals_narrow_with_more_tokens(model, store):
    from saekit.metrics import ce_metrics_many, paired_difference

    pos = store.positions()
    keep = np.zeros(store.tokens.shape, dtype=bool)
    keep[pos[:, 0], pos[:, 1]] = True
    tokens = np.array(store.tokens)
    torch.manual_seed(0)
    rough = make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval()
    perfect, few = ce_metrics_many(
        [identity_sae(576), rough], model, tokens[:6], keep[:6], hook=HOOK
    )
    assert perfect["intervals"]["ce_recovered"] == [1.0, 1.0] and perfect["intervals"][
        "ce_recovered_mean"
    ] == [1.0, 1.0]
    many = ce_metrics_many([rough], model, tokens, keep, hook=HOOK)[0]
    width = lambda m: m["intervals"]["ce_recovered"][1] - m["intervals"]["ce_recovered"][0]
    assert many["n_sequences"] > 4 * few["n_sequences"] and 0 < width(many) < width(few)
    # a paired difference of an SAE with itself is exactly zero; against the perfect
    # SAE it excludes zero
    as_eval = lambda m: {"per_sequence": {"ce": m["_per_sequence"]}}
    same = paired_difference(as_eval(few), as_eval(few), "ce_recovered")
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and not same["excludes_zero"]
    d = paired_difference(as_eval(perfect), as_eval(few), "ce_recovered")
    assert (
        d["excludes_zero"]
        and d["interval"][0] > 0
        and d["difference"] == pytest.approx(1 - few["ce_recovered"])
    )


def test_batchtopk_evaluation_does_not_depend_on_batch_size(store):
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train

    res = train(
        store,
        SAEConfig(arch="batchtopk", d_in=576, d_sae=1152, k=8, hook_name=store.hook),
        TrainConfig(total_tokens=4000, batch_size=256, warmup_steps=2, progress=False),
    )
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
    assert [m["nmse"] for m in both] == [b["nmse"], d["nmse"]] and [m["l0"] for m in both] == [
        b["l0"],
        d["l0"],
    ]
    # evaluate() reads the store once for threshold and batch mode (it read it twice before)
    reads = []
    take = type(store).take
    store.take = lambda rows, hook=None: reads.append(len(rows)) or take(store, rows, hook)
    try:
        m = evaluate(sae, None, store, n_tokens=1000, batch_size=400)
    finally:
        del store.take
    assert reads == [400, 400, 200] and m["sparsity"]["l0_batch_mode"] > 0
    assert m["sparsity"]["l0_threshold_over_batch"] == pytest.approx(
        m["sparsity"]["l0"] / m["sparsity"]["l0_batch_mode"]
    )


def test_per_token_l0_matches_a_constructed_sae(store):
    from saekit.metrics import per_token_l0

    x = store.rows(0, 300, HOOK).float()
    counts = per_token_l0(split_sae("batchtopk", threshold=0.5), store, n_tokens=300)
    assert (counts == (x.abs() > 0.5).sum(-1).numpy()).all()
