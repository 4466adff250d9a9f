"""Analysis values on SAEs built by hand (so counts and examples are known), figures and widgets."""
import types

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
    assert lat == (j if a[3, j] > 0 else j + 576) and val == pytest.approx(a[3, j].abs().item(), rel=1e-5)


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
    idx = analysis.build_feature_index(sae, store, n_tokens=1500, tokenizer=tokenizer, progress=False)
    col = x[:1500, 5]
    rows, vals = idx.activations(5)
    assert vals[0] == pytest.approx(float(col.max()), rel=1e-5) and rows[0] == int(col.argmax())
    assert (np.diff(vals) <= 0).all()
    assert idx.density[5] == pytest.approx(float((col > 0).float().mean()))
    assert idx.density[5] + idx.density[5 + 576] == pytest.approx(float((col != 0).float().mean()))
    ex = idx.top_examples(5, n=3)
    seq, pos = store.positions()[rows[0]]
    assert ex[0]["sequence"] == seq and ex[0]["position"] == pos and ex[0]["activation"] == pytest.approx(vals[0])
    assert ex[0]["tokens"][ex[0]["focus"]] == idx.token_strings[int(store.tokens[seq, pos])]
    q = idx.quantile_examples(5, n_bins=4, per_bin=2)
    assert len(q) == 8 and [e["bin"] for e in q] == [3, 3, 2, 2, 1, 1, 0, 0]
    groups = idx.quantile_groups(5, n_bins=4, per_bin=2)
    assert sum(g["share"] for g in groups) == pytest.approx(1.0) and groups[0]["range"][1] == pytest.approx(vals[0])
    assert all(g["range"][0] <= e["activation"] <= g["range"][1] for g in groups for e in g["examples"])
    # every context token carries the latent's activation on it (relu(x_5) here), the window 24 before / 8 after
    e = ex[0]
    assert len(e["tokens"]) <= 33 and e["values"][e["focus"]] == pytest.approx(vals[0])
    seq_rows = {int(p): i for i, (s_, p) in enumerate(store.positions()[:1500].tolist()) if s_ == seq}
    for j, v in enumerate(e["values"]):
        p_ = pos - e["focus"] + j
        want = float(torch.relu(x[seq_rows[p_], 5])) if p_ in seq_rows else 0.0
        assert v == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert viz.examples_html([e]).count("<span title=") == sum(1 for v in e["values"] if v) + (e["values"][e["focus"]] == 0)
    dfig = viz.density_histogram_figure(idx.density, 5)
    assert f"{int((idx.density == 0).sum()):,} dead" in dfig.layout.title.text and len(dfig.layout.shapes) == 1
    assert idx.neighbours(5, n=1)[0][1] == pytest.approx(0.0, abs=1e-6)  # all rows orthogonal or opposite
    # firing together: latent j (relu(x_j)) and latent 5 both fire where x_5 > 0 and x_j > 0
    co = idx.coactivation_neighbours(5, n=3)
    pos5 = x[:1500, 5] > 0
    for j, share in co:
        assert j != 5 and share == pytest.approx(float(((x[:1500, j % 576] * (1 if j < 576 else -1)) > 0)[pos5]
                                                       .float().mean()), abs=1e-6)
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
    assert [tr.type for tr in fig.data] == ["bar", "bar", "histogram"] and (fig.data[0].xaxis, fig.data[1].xaxis) == ("x", "x2")


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
    t = pd.DataFrame({"position": range(5), "token": ["<s>", "a", " b", "\n", "c"], "count": [0, 3, 1, 4, 2],
                      "kept": [False, True, True, True, True], "top_latents": [[], [(1, .5)], [(2, .1)], [(3, .9)], []]})
    fig = viz.token_counts_figure({"BatchTopK": t, "TopK": t.assign(count=[0, 2, 2, 2, 2])}, width=3)
    assert len(fig.data) == 2
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (2, 3) and np.isnan(z[0, 0]) and z[0, 1] == 3 and z[1, 0] == 4
    assert "3 active latents" in fig.data[0].hovertext[0][1] and fig.data[0].text[1][0] == "⏎"
    h = viz.l0_distribution_figure({"TopK": np.full(50, 8), "BatchTopK": np.arange(50) % 17}, k=8)
    assert [tr.type for tr in h.data] == ["histogram", "histogram"] and "mean 8.0" in h.data[0].name
    # side by side, each in its own panel and normalised: the spike does not set the other's scale
    assert (h.data[0].xaxis, h.data[1].xaxis) == ("x", "x2") and {tr.histnorm for tr in h.data} == {"percent"}
    assert len(h.layout.shapes) == 2 and "share of tokens" in h.layout.yaxis.title.text
    html = viz.examples_html([{"tokens": ["a", "<b>", "c"], "focus": 1, "activation": 2.0}])
    assert "&lt;b&gt;" in html and "rgba(214,39,40,1.00)" in html


def test_allocation_explorer_responds(model):
    from saekit.widgets import AllocationExplorer

    bt = split_sae("batchtopk", threshold=0.5)
    tk = split_sae("topk", k=9)
    ex = AllocationExplorer({"BatchTopK": bt, "TopK": tk}, model, texts={"t": TEXT})
    before = np.nansum(np.array(ex.figure.data[0].z, dtype=float))
    assert ex.threshold.value == pytest.approx(0.5)
    ex.threshold.value = 2.0  # a higher threshold: fewer latents everywhere
    after = np.nansum(np.array(ex.figure.data[0].z, dtype=float))
    assert after < before
    ex.sae_choice.value = "TopK"
    assert ex.k.value == 9 and set(ex.table().query("kept")["count"]) == {9}
    ex.k.value = 4
    assert set(ex.table().query("kept")["count"]) == {4}
    assert np.nanmax(np.array(ex.figure.data[0].z, dtype=float)) == 4
    ex.text.value = "A different sentence."
    assert len(ex.table()) == len(analysis.text_ids(model, "A different sentence."))
    assert "mean" in ex.summary.value
    assert ex.errors == [] and ex.log in ex.widget.children


def test_explorers_act_on_enter_keep_their_scale_and_never_fail_silently(model):
    from saekit.widgets import AllocationExplorer

    bt = split_sae("batchtopk", threshold=0.5, k=4)
    ex = AllocationExplorer({"BatchTopK": bt}, model, texts={"t": TEXT})
    assert not ex.text.continuous_update  # the model runs when the box is left, not on every key
    assert "trained 0.500" in ex.threshold.description
    zmax = ex.figure.data[0].zmax
    for theta in (0.1, 1.0, 3.0):  # the colour scale stays put while the slider moves
        ex.threshold.value = theta
        assert ex.figure.data[0].zmax == zmax == 3 * 4
    ex.reset.click()
    assert ex.threshold.value == pytest.approx(0.5)
    ex.saes["BatchTopK"] = None  # a broken state: the callback's error goes to the log, not into the void
    ex.threshold.value = 0.7
    assert len(ex.errors) == 1 and "AttributeError" in str(ex.log.outputs)


def test_feature_and_frontier_explorers(model, store, tokenizer):
    from saekit.widgets import FeatureExplorer, FrontierExplorer

    sae = split_sae()
    idx = analysis.build_feature_index(sae, store, n_tokens=800, tokenizer=tokenizer, progress=False)
    fe = FeatureExplorer(idx, sae, model)
    fe.latent.value = 11
    assert "Latent 11" in fe.info.value and len(fe.hist.data[0].x) == len(idx.activations(11)[1])
    assert len(fe.logits.data[0].y) == 10
    target = eff_tok = analysis.logit_effects(sae, model, 42, n=1)["promoted"][0][0]
    fe.search_in.value = "promoted tokens"
    fe.search.value = eff_tok
    assert 42 in [v for _, v in fe.results.options] or len(fe.results.options) == 20
    assert all(any(target.lower() in model.tokenizer.decode([int(i)]).lower() for i in fe._promoted[h])
               for _, h in fe.results.options)
    fe.search_in.value = "example tokens"  # changing the field reruns the search on it
    assert [v for _, v in fe.results.options] == list(idx.search_text(eff_tok))
    fe.search_in.value = "example contexts"
    ctx_hits = [v for _, v in fe.results.options]
    assert ctx_hits == list(idx.search_text(eff_tok, where="context"))
    assert set(idx.search_text(eff_tok, n=10**6)) <= set(idx.search_text(eff_tok, n=10**6, where="context"))
    button = next(b for b in fe.neighbour_buttons.children if (getattr(b, "tooltip", None) or "").startswith("open latent"))
    button.click()  # a neighbour opens in the view
    assert fe.latent.value == int(button.tooltip.split()[-1]) and f"Latent {fe.latent.value}" in fe.info.value
    fe.latent.value = 11
    assert not fe.search.continuous_update and not fe.latent.continuous_update and fe.errors == []
    wide = fe.examples.value.count("<span")
    fe.before.value, fe.after.value = 2, 1  # a narrower window: fewer context tokens shown
    assert 0 < fe.examples.value.count("<span") < wide and fe.errors == []
    fe.before.value, fe.after.value = 24, 8
    fe.order.value = "density (high first)"
    seq = list(np.argsort(-idx.density, kind="stable"))
    fe.step(+1)
    assert fe.latent.value == int(seq[seq.index(11) + 1])
    df = pd.DataFrame({"name": ["a", "b"], "architecture": ["batchtopk", "topk"], "l0": [10.0, 10.0],
                       "nmse": [0.1, 0.2], "ce_recovered": [0.9, 0.8], "dead_fraction": [0.0, 0.0]})
    fr = FrontierExplorer(df, {"a": np.arange(20) % 7, "b": np.full(20, 10)})
    fr._on_click(fr.figure.data[0], types.SimpleNamespace(point_inds=[0]))
    assert "<b>a</b>" in fr.selected.value and len(fr.detail.data) == 1
    fr.select("b")
    assert "<b>b</b>" in fr.selected.value and list(fr.detail.data[0].x) == [10] * 20


def test_matryoshka_group_counts_and_views(model, acts, store):
    """The split SAE as a Matryoshka: latent j < 576 reads +x_j, so a token's latents per nested group
    are known from x; prefixes add coordinates, so their NMSE cannot rise."""
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
    props = pd.DataFrame({"token": ["a"] * 5 + ["b"] * 5 + ["c"] * 2, "count": [1] * 5 + [9] * 5 + [50, 50]})
    out = analysis.count_by_token(props, min_occurrences=3)
    assert out["token"].tolist() == ["b", "a"] and out["mean"].tolist() == [9.0, 1.0]
    assert out["occurrences"].tolist() == [5, 5]


def test_training_monitor_plots_against_tokens_with_the_target_marked():
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train
    from saekit.widgets import TrainingMonitor

    mon = TrainingMonitor(every=2)
    x = torch.randn(2048, 16)
    train(x, [SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=4, normalize="none")],
          TrainConfig(total_tokens=2048, batch_size=256, warmup_steps=1, progress=False), callback=mon)
    loss, l0 = mon.figure.data[0], mon.figure.data[2]
    assert list(loss.x) == [512 * i for i in range(1, 5)] and len(l0.y) == 4  # tokens on x, every 2nd step
    assert mon.figure.layout.yaxis.type == "log" and mon.figure.layout.xaxis.title.text == "training tokens"
    assert [sh.y0 for sh in mon.figure.layout.shapes] == [4]  # a dashed line at k in the L0 panel


def test_a_reused_run_shows_its_saved_curves_in_the_monitor(tmp_path):
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train
    from saekit.widgets import TrainingMonitor

    x = torch.randn(2048, 16)
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=4, normalize="none")
    tc = TrainConfig(total_tokens=2048, batch_size=256, warmup_steps=1, progress=False, log_every=2)
    live = TrainingMonitor(every=2)
    first = train(x, cfg, tc, out=tmp_path, callback=live)
    live.show_result(first)  # it ran live: nothing is added
    again = TrainingMonitor(every=2)
    result = train(x, cfg, tc, out=tmp_path, callback=again)  # already trained: no step runs
    assert not again.figure.data
    again.show_result(result)
    assert len(again.figure.data) == len(live.figure.data) == 4
    assert [t.xaxis for t in again.figure.data] == ["x", "x2", "x3", "x4"]  # each curve in its own panel
    assert list(again.figure.data[2].y) == list(result.logs[0]["l0"])
    assert [sh.y0 for sh in again.figure.layout.shapes] == [4]


def test_latent_on_typed_text_and_its_causal_effect(model):
    """A hypothesis test and a causal check on typed text, with an SAE whose latent j reads relu(x_j)."""
    sae = split_sae()
    acts, _, _ = analysis.text_activations(model, TEXT, HOOK)
    j = int(acts[1:].max(0).values.argmax())  # the dimension with the largest activation: its latent fires strongly
    t = analysis.latent_on_text(sae, model, TEXT, j)
    assert t["activation"].iloc[0] == 0  # BOS
    np.testing.assert_allclose(t["activation"][1:], torch.relu(acts[1:, j]).numpy(), rtol=1e-5, atol=1e-5)
    none = analysis.causal_effect(sae, model, TEXT, j, steer=0.0)  # an edit of nothing changes nothing
    assert none["kl_next"] < 1e-6 and (none["top"]["change"].abs() < 1e-5).all()
    ab = analysis.causal_effect(sae, model, TEXT, j)
    assert ab["edit"] == "ablate" and ab["fired_on"] == int((t["activation"] > 0).sum()) > 0
    assert ab["kl_next"] > 1e-4 and ab["kl_mean"] > 0 and len(ab["top"]) == 10
    assert abs(ab["top"]["change"]).is_monotonic_decreasing
    html = viz.causal_html(ab)
    assert "nats" in html and __import__("html").escape(ab["top"]["token"].iloc[0]) in html


def test_feature_explorer_tries_typed_text_and_edits(model, store, tokenizer):
    from saekit.widgets import FeatureExplorer

    sae = split_sae()
    idx = analysis.build_feature_index(sae, store, n_tokens=400, tokenizer=tokenizer, progress=False)
    fe = FeatureExplorer(idx, sae, model)
    fe.probe.value = TEXT
    assert fe.probe_out.value.count("<span title=") == len(analysis.text_ids(model, TEXT)) - 1
    fe.edit.value = "steer"
    fe.run_edit.click()
    assert "steer +5" in fe.edit_out.value and "KL" in fe.edit_out.value and fe.errors == []


def test_clicking_a_token_lists_its_latents_and_opens_them(model, acts, store, tokenizer):
    """04's heat-map: a token's active latents with value and share of the reconstruction, each one a button that
    opens the latent in the feature view."""
    from saekit.widgets import AllocationExplorer, FeatureExplorer

    a, tokens, kept = acts
    sae = split_sae("batchtopk", threshold=0.5)
    z = analysis.codes_with(sae, a)
    t = analysis.token_latents(sae, z[3])
    assert len(t) == int((z[3] != 0).sum()) and (np.diff(t["activation"]) <= 0).all()
    assert t["share"].sum() == pytest.approx(1.0, abs=1e-4)
    # share: the contribution projected on the decoded sum, over its squared norm, computed directly
    W = sae.W_dec.detach()
    total = z[3] @ W
    j, v = int(t["latent"][0]), float(t["activation"][0])
    assert t["share"][0] == pytest.approx(float((v * W[j]) @ total / total.dot(total)), rel=1e-4)
    fx = FeatureExplorer(analysis.build_feature_index(sae, store, n_tokens=400, tokenizer=tokenizer, progress=False),
                         sae, model)
    ex = AllocationExplorer({"BatchTopK": sae}, model, texts={"t": TEXT}, feature_explorers={"BatchTopK": fx})
    click = types.SimpleNamespace(xs=[3], ys=[0])  # row 0, column 3 of the heat-map: position 3
    ex._on_click(ex.figure.data[0], click)
    assert repr(tokens[3]) in ex.token_info.value and f"{len(t)} active latents" in ex.token_info.value
    first = ex.token_buttons.children[0]
    assert first.description.startswith(f"#{j} ") and not first.disabled
    first.click()
    assert fx.latent.value == j and f"Latent {j}" in fx.info.value
    assert ex.errors == [] and fx.errors == []


def test_ablating_a_silent_latent_changes_nothing_and_steering_a_token_direction_raises_it(model):
    """The causal check's two anchors: ablating a latent that never fires on the text changes nothing; a latent
    built to write a token's unembedding direction (through the final norm) raises that token when steered."""
    sae = split_sae()
    acts, _, _ = analysis.text_activations(model, TEXT, HOOK)
    always_positive = int(((acts[1:] > 0).all(0) * acts[1:].abs().min(0).values).argmax())
    assert (acts[1:, always_positive] > 0).all()
    silent = always_positive + 576  # reads -x_j: never fires on this text
    assert (analysis.latent_on_text(sae, model, TEXT, silent)["activation"] == 0).all()
    off = analysis.causal_effect(sae, model, TEXT, silent)
    assert off["fired_on"] == 0 and off["kl_next"] < 1e-9 and off["kl_mean"] < 1e-9
    # a latent that writes " Paris" into the last layer's output (resid_post.29 feeds the final norm)
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
