"""Analysis values on SAEs built by hand (so counts and examples are known), figures and widgets."""

import types

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HOOK, split_sae

from saekit import analysis

TEXT = "It was the best of times, it was the worst of times."


@pytest.fixture(scope="module")
def acts(model):
    a, tokens, kept = analysis.text_activations(model, TEXT, HOOK)
    return a, tokens, kept


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
    # a broken state: the callback's error goes to the log, not into the void
    ex.saes["BatchTopK"] = None
    ex.threshold.value = 0.7
    assert len(ex.errors) == 1 and "AttributeError" in str(ex.log.outputs)


def test_feature_and_frontier_explorers(model, store, tokenizer):
    from saekit.widgets import FeatureExplorer, FrontierExplorer

    sae = split_sae()
    idx = analysis.build_feature_index(
        sae, store, n_tokens=800, tokenizer=tokenizer, progress=False
    )
    fe = FeatureExplorer(idx, sae, model)
    fe.latent.value = 11
    assert "Latent 11" in fe.info.value and len(fe.hist.data[0].x) == len(idx.activations(11)[1])
    assert len(fe.logits.data[0].y) == 10
    target = eff_tok = analysis.logit_effects(sae, model, 42, n=1)["promoted"][0][0]
    fe.search_in.value = "promoted tokens"
    fe.search.value = eff_tok
    assert 42 in [v for _, v in fe.results.options] or len(fe.results.options) == 20
    assert all(
        any(target.lower() in model.tokenizer.decode([int(i)]).lower() for i in fe._promoted[h])
        for _, h in fe.results.options
    )
    fe.search_in.value = "example tokens"  # changing the field reruns the search on it
    assert [v for _, v in fe.results.options] == list(idx.search_text(eff_tok))
    fe.search_in.value = "example contexts"
    ctx_hits = [v for _, v in fe.results.options]
    assert ctx_hits == list(idx.search_text(eff_tok, where="context"))
    assert set(idx.search_text(eff_tok, n=10**6)) <= set(
        idx.search_text(eff_tok, n=10**6, where="context")
    )
    button = next(
        b
        for b in fe.neighbour_buttons.children
        if (getattr(b, "tooltip", None) or "").startswith("open latent")
    )
    button.click()  # a neighbour opens in the view
    assert (
        fe.latent.value == int(button.tooltip.split()[-1])
        and f"Latent {fe.latent.value}" in fe.info.value
    )
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
    df = pd.DataFrame(
        {
            "name": ["a", "b"],
            "architecture": ["batchtopk", "topk"],
            "l0": [10.0, 10.0],
            "nmse": [0.1, 0.2],
            "ce_recovered": [0.9, 0.8],
            "dead_fraction": [0.0, 0.0],
        }
    )
    fr = FrontierExplorer(df, {"a": np.arange(20) % 7, "b": np.full(20, 10)})
    fr._on_click(fr.figure.data[0], types.SimpleNamespace(point_inds=[0]))
    assert "<b>a</b>" in fr.selected.value and len(fr.detail.data) == 1
    fr.select("b")
    assert "<b>b</b>" in fr.selected.value and list(fr.detail.data[0].x) == [10] * 20


def test_training_monitor_plots_against_tokens_with_the_target_marked():
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train
    from saekit.widgets import TrainingMonitor

    mon = TrainingMonitor(every=2)
    x = torch.randn(2048, 16)
    train(
        x,
        [SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=4, normalize="none")],
        TrainConfig(total_tokens=2048, batch_size=256, warmup_steps=1, progress=False),
        callback=mon,
    )
    loss, l0 = mon.figure.data[0], mon.figure.data[2]
    # tokens on x, every 2nd step
    assert list(loss.x) == [512 * i for i in range(1, 5)] and len(l0.y) == 4
    assert (
        mon.figure.layout.yaxis.type == "log"
        and mon.figure.layout.xaxis.title.text == "training tokens"
    )
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
    # each curve in its own panel
    assert [t.xaxis for t in again.figure.data] == ["x", "x2", "x3", "x4"]
    assert list(again.figure.data[2].y) == list(result.logs[0]["l0"])
    assert [sh.y0 for sh in again.figure.layout.shapes] == [4]


def test_feature_explorer_tries_typed_text_and_edits(model, store, tokenizer):
    from saekit.widgets import FeatureExplorer

    sae = split_sae()
    idx = analysis.build_feature_index(
        sae, store, n_tokens=400, tokenizer=tokenizer, progress=False
    )
    fe = FeatureExplorer(idx, sae, model)
    fe.probe.value = TEXT
    assert fe.probe_out.value.count("<span title=") == len(analysis.text_ids(model, TEXT)) - 1
    fe.edit.value = "steer"
    fe.run_edit.click()
    assert "steer +5" in fe.edit_out.value and "KL" in fe.edit_out.value and fe.errors == []


def test_clicking_a_token_lists_its_latents_and_opens_them(model, acts, store, tokenizer):
    """04's heat-map: a token's active latents with value and share of the reconstruction, each one
    a button that opens the latent in the feature view."""
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
    fx = FeatureExplorer(
        analysis.build_feature_index(sae, store, n_tokens=400, tokenizer=tokenizer, progress=False),
        sae,
        model,
    )
    ex = AllocationExplorer(
        {"BatchTopK": sae}, model, texts={"t": TEXT}, feature_explorers={"BatchTopK": fx}
    )
    click = types.SimpleNamespace(xs=[3], ys=[0])  # row 0, column 3 of the heat-map: position 3
    ex._on_click(ex.figure.data[0], click)
    assert (
        repr(tokens[3]) in ex.token_info.value and f"{len(t)} active latents" in ex.token_info.value
    )
    first = ex.token_buttons.children[0]
    assert first.description.startswith(f"#{j} ") and not first.disabled
    first.click()
    assert fx.latent.value == j and f"Latent {j}" in fx.info.value
    assert ex.errors == [] and fx.errors == []
