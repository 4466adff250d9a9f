"""Analysis values on SAEs built by hand (so counts and examples are known), figures and widgets."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HOOK, split_sae

from saekit import analysis, viz

TEXT = "It was the best of times, it was the worst of times."


@pytest.fixture(scope="module")
def acts(model):
    a, tokens, kept = analysis.text_activations(model, TEXT, HOOK)
    return a, tokens, kept


def test_latent_counts_are_known_for_a_constructed_sae(model, acts):
    a, tokens, kept = acts
    thr = float(a[1:].abs().median())
    df = analysis.latent_counts(split_sae("batchtopk", threshold=thr), model, TEXT)
    assert list(df.columns) == ["position", "token_id", "token", "count", "kept", "top_latents"]
    assert "".join(df.token[1:]) == TEXT and not df.kept[0] and df["count"][0] == 0
    expected = (a.abs() > thr).sum(-1).numpy()
    assert (df["count"][1:].to_numpy() == expected[1:]).all()
    # the strongest latent of each token is its largest |x_j|, on the side of its sign
    j = a[3].abs().argmax().item()
    lat, val = df.top_latents[3][0]
    assert lat == (j if a[3, j] > 0 else j + 576) and val == pytest.approx(
        a[3, j].abs().item(), rel=1e-5
    )


def test_codes_with_threshold_and_k(acts):
    a, tokens, kept = acts
    sae = split_sae("topk", k=7)
    z = analysis.codes_with(sae, a, k=3)
    assert ((z != 0).sum(-1) == 3).all()
    z = analysis.codes_with(sae, a, threshold=1.0)
    assert torch.equal((z != 0).sum(-1), (a.abs() > 1.0).sum(-1))
    assert ((analysis.codes_with(sae, a) != 0).sum(-1) == 7).all()


def test_feature_index_examples_and_density(store, tokenizer):
    x = store.load()
    sae = split_sae()
    idx = analysis.build_feature_index(
        sae, store, n_tokens=1500, tokenizer=tokenizer, progress=False
    )
    col = x[:1500, 5]
    rows, vals = idx.activations(5)
    assert vals[0] == pytest.approx(float(col.max()), rel=1e-5) and rows[0] == int(col.argmax())
    assert (np.diff(vals) <= 0).all()
    assert idx.density[5] == pytest.approx(float((col > 0).float().mean()))
    assert idx.density[5] + idx.density[5 + 576] == pytest.approx(float((col != 0).float().mean()))
    ex = idx.top_examples(5, n=3)
    seq, pos = store.positions()[rows[0]]
    assert (
        ex[0]["sequence"] == seq
        and ex[0]["position"] == pos
        and ex[0]["activation"] == pytest.approx(vals[0])
    )
    assert ex[0]["tokens"][ex[0]["focus"]] == idx.token_strings[int(store.tokens[seq, pos])]
    q = idx.quantile_examples(5, n_bins=4, per_bin=2)
    assert len(q) == 8 and [e["bin"] for e in q] == [3, 3, 2, 2, 1, 1, 0, 0]
    groups = idx.quantile_groups(5, n_bins=4, per_bin=2)
    assert sum(g["share"] for g in groups) == pytest.approx(1.0) and groups[0]["range"][
        1
    ] == pytest.approx(vals[0])
    assert all(
        g["range"][0] <= e["activation"] <= g["range"][1] for g in groups for e in g["examples"]
    )
    # every context token carries the latent's activation on it (relu(x_5) here), the window 24
    # before / 8 after
    e = ex[0]
    assert len(e["tokens"]) <= 33 and e["values"][e["focus"]] == pytest.approx(vals[0])
    seq_rows = {
        int(p): i for i, (s_, p) in enumerate(store.positions()[:1500].tolist()) if s_ == seq
    }
    for j, v in enumerate(e["values"]):
        p_ = pos - e["focus"] + j
        want = float(torch.relu(x[seq_rows[p_], 5])) if p_ in seq_rows else 0.0
        assert v == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert viz.examples_html([e]).count("<span title=") == sum(1 for v in e["values"] if v) + (
        e["values"][e["focus"]] == 0
    )
    dfig = viz.density_histogram_figure(idx.density, 5)
    assert (
        f"{int((idx.density == 0).sum()):,} dead" in dfig.layout.title.text
        and len(dfig.layout.shapes) == 1
    )
    # all rows orthogonal or opposite
    assert idx.neighbours(5, n=1)[0][1] == pytest.approx(0.0, abs=1e-6)
    # firing together: latent j (relu(x_j)) and latent 5 both fire where x_5 > 0 and x_j > 0
    co = idx.coactivation_neighbours(5, n=3)
    pos5 = x[:1500, 5] > 0
    for j, share in co:
        assert j != 5 and share == pytest.approx(
            float(((x[:1500, j % 576] * (1 if j < 576 else -1)) > 0)[pos5].float().mean()), abs=1e-6
        )
    assert co == sorted(co, key=lambda t: -t[1])
    focus_tok = ex[0]["tokens"][ex[0]["focus"]].strip()
    if focus_tok:
        assert 5 in idx.search_text(focus_tok, n=2000)


def test_logit_effects_follow_the_unembedding(model):
    sae = split_sae()
    eff = analysis.logit_effects(sae, model, 7, n=5)
    W_U = model._module.get_output_embeddings().weight
    gamma = model._module.model.norm.weight  # SmolLM2's final RMSNorm: its gain is folded in
    assert eff["gain_folded"] and torch.equal(analysis.final_norm_gain(model), gamma.float())
    best = (W_U[:, 7] * gamma[7]).topk(5).indices
    assert [t for t, _ in eff["promoted"]] == [model.tokenizer.decode([int(i)]) for i in best]
    assert eff["promoted"][0][1] >= eff["promoted"][-1][1] and eff["suppressed"][0][1] <= 0
    assert eff["all"].shape == (W_U.shape[0],)
    fig = viz.logit_effects_figure(eff, 7)
    assert [tr.type for tr in fig.data] == ["bar", "bar", "histogram"] and (
        fig.data[0].xaxis,
        fig.data[1].xaxis,
    ) == ("x", "x2")


def test_token_properties_and_correlations(model, store):
    sae = split_sae("batchtopk", threshold=0.5)
    props = analysis.token_properties(sae, model, store, n_tokens=300)
    assert len(props) == 300 and props.model_loss.notna().all()
    x = store.load()[:300]
    assert (props["count"].to_numpy() == (x.abs() > 0.5).sum(-1).numpy()).all()
    assert props.recon_error.between(0, 1).all()
    corr = analysis.count_correlations(props)
    assert set(corr.index) == {"position", "token_frequency", "model_loss", "recon_error", "norm"}
    assert corr.abs().max() <= 1


def test_figures_hold_the_data():
    t = pd.DataFrame(
        {
            "position": range(5),
            "token": ["<s>", "a", " b", "\n", "c"],
            "count": [0, 3, 1, 4, 2],
            "kept": [False, True, True, True, True],
            "top_latents": [[], [(1, 0.5)], [(2, 0.1)], [(3, 0.9)], []],
        }
    )
    fig = viz.token_counts_figure(
        {"BatchTopK": t, "TopK": t.assign(count=[0, 2, 2, 2, 2])}, width=3
    )
    assert len(fig.data) == 2
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (2, 3) and np.isnan(z[0, 0]) and z[0, 1] == 3 and z[1, 0] == 4
    assert "3 active latents" in fig.data[0].hovertext[0][1] and fig.data[0].text[1][0] == "⏎"
    h = viz.l0_distribution_figure({"TopK": np.full(50, 8), "BatchTopK": np.arange(50) % 17}, k=8)
    assert [tr.type for tr in h.data] == ["histogram", "histogram"] and "mean 8.0" in h.data[0].name
    # side by side, each in its own panel and normalised: the spike does not set the other's scale
    assert (h.data[0].xaxis, h.data[1].xaxis) == ("x", "x2") and {tr.histnorm for tr in h.data} == {
        "percent"
    }
    assert len(h.layout.shapes) == 2 and "share of tokens" in h.layout.yaxis.title.text
    html = viz.examples_html([{"tokens": ["a", "<b>", "c"], "focus": 1, "activation": 2.0}])
    assert "&lt;b&gt;" in html and "rgba(214,39,40,1.00)" in html


def test_matryoshka_group_counts_and_views(model, acts, store):
    """The split SAE as a Matryoshka: latent j < 576 reads +x_j, so a token's latents per nested
    group are known from x; prefixes add coordinates, so their NMSE cannot rise."""
    from saekit.metrics import evaluate
    from saekit.widgets import FeatureExplorer

    a, tokens, kept = acts
    thr = float(a[1:].abs().median())
    sae = split_sae("matryoshka", threshold=thr)
    assert sae.cfg.group_sizes == [72, 72, 144, 288, 576]
    df = analysis.group_counts(sae, model, TEXT)
    groups = [c for c in df.columns if c.startswith("g")]
    assert groups[0] == "g1 (0-71)" and groups[-1] == "g5 (576-1151)"
    on = (a.abs() > thr) & torch.from_numpy(kept)[:, None]
    pos, neg = on & (a > 0), on & (a < 0)
    assert (df[groups[0]] == pos[:, :72].sum(-1).numpy()).all()
    assert (df[groups[3]] == pos[:, 288:].sum(-1).numpy()).all()
    assert (df[groups[4]] == neg.sum(-1).numpy()).all()
    assert (df[groups].sum(axis=1) == df["count"]).all()
    fig = viz.group_counts_figure(df)
    assert len(fig.data) == 5 and sum(np.sum(t.y) for t in fig.data) == df["count"].sum()
    with pytest.raises(ValueError, match="Matryoshka"):
        analysis.group_counts(split_sae("batchtopk", threshold=thr), model, TEXT)

    m = evaluate(sae, model, store, n_tokens=400, ce_tokens=48, hook=HOOK)
    nm = [p["nmse"] for p in m["prefixes"]]
    assert all(x >= y - 1e-9 for x, y in zip(nm, nm[1:])) and nm[0] > nm[-1]
    assert m["sae"]["group_sizes"] == [72, 72, 144, 288, 576] and m["mode"] == "threshold"
    pf = viz.prefix_figure(m["prefixes"])
    assert len(pf.data) == 2 and list(pf.data[0].x) == [72, 144, 288, 576, 1152]

    index = analysis.build_feature_index(sae, store, n_tokens=300, progress=False)
    ex = FeatureExplorer(index, sae)
    ex.latent.value = 600
    assert "nested group <b>5</b> of 5" in ex.info.value
    ex.latent.value = 10
    assert "nested group <b>1</b> of 5" in ex.info.value


def test_count_by_token_ranks_tokens_by_mean_count():
    props = pd.DataFrame(
        {"token": ["a"] * 5 + ["b"] * 5 + ["c"] * 2, "count": [1] * 5 + [9] * 5 + [50, 50]}
    )
    out = analysis.count_by_token(props, min_occurrences=3)
    assert out["token"].tolist() == ["b", "a"] and out["mean"].tolist() == [9.0, 1.0]
    assert out["occurrences"].tolist() == [5, 5]


def test_latent_on_typed_text_and_its_causal_effect(model):
    """A hypothesis test and a causal check on typed text, with an SAE whose latent j reads
    relu(x_j)."""
    sae = split_sae()
    acts, _, _ = analysis.text_activations(model, TEXT, HOOK)
    # the dimension with the largest activation: its latent fires strongly
    j = int(acts[1:].max(0).values.argmax())
    t = analysis.latent_on_text(sae, model, TEXT, j)
    assert t["activation"].iloc[0] == 0  # BOS
    np.testing.assert_allclose(
        t["activation"][1:], torch.relu(acts[1:, j]).numpy(), rtol=1e-5, atol=1e-5
    )
    # an edit of nothing changes nothing
    none = analysis.causal_effect(sae, model, TEXT, j, steer=0.0)
    assert none["kl_next"] < 1e-6 and (none["top"]["change"].abs() < 1e-5).all()
    ab = analysis.causal_effect(sae, model, TEXT, j)
    assert ab["edit"] == "ablate" and ab["fired_on"] == int((t["activation"] > 0).sum()) > 0
    assert ab["kl_next"] > 1e-4 and ab["kl_mean"] > 0 and len(ab["top"]) == 10
    assert abs(ab["top"]["change"]).is_monotonic_decreasing
    html = viz.causal_html(ab)
    assert "nats" in html and __import__("html").escape(ab["top"]["token"].iloc[0]) in html


def test_ablating_a_silent_latent_changes_nothing_and_steering_a_token_direction_raises_it(model):
    """The causal check's two anchors: ablating a latent that never fires on the text changes
    nothing; a latent built to write a token's unembedding direction (through the final norm)
    raises that token when steered."""
    sae = split_sae()
    acts, _, _ = analysis.text_activations(model, TEXT, HOOK)
    always_positive = int(((acts[1:] > 0).all(0) * acts[1:].abs().min(0).values).argmax())
    assert (acts[1:, always_positive] > 0).all()
    silent = always_positive + 576  # reads -x_j: never fires on this text
    assert (analysis.latent_on_text(sae, model, TEXT, silent)["activation"] == 0).all()
    off = analysis.causal_effect(sae, model, TEXT, silent)
    assert off["fired_on"] == 0 and off["kl_next"] < 1e-9 and off["kl_mean"] < 1e-9
    # a latent that writes " Paris" into the last layer's output (resid_post.29
    # feeds the final norm)
    last = split_sae()
    last.cfg.hook_name = "resid_post.29"
    target = model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    W_U = model._module.get_output_embeddings().weight.detach()
    direction = W_U[target] / analysis.final_norm_gain(model)
    with torch.no_grad():
        last.W_dec[0].copy_(direction / direction.norm())
    clean = analysis.causal_effect(last, model, TEXT, 0, steer=0.0)
    steered = analysis.causal_effect(last, model, TEXT, 0, steer=200.0)
    row = steered["top"][steered["top"]["token"] == " Paris"]
    assert len(row) == 1 and row["p_edited"].iloc[0] > 10 * row["p_clean"].iloc[0]
    assert steered["edited_top"][0][0] == " Paris" and clean["kl_next"] < 1e-9
