"""What each notebook shows, as assertions the tests run in the notebook's own kernel after its last
cell (the notebooks end in what they teach; these checks are the tests' business). Each check ends
by printing "ok", which the browser test waits for."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell

ROOT = Path(__file__).resolve().parents[1]

CHECKS = {
    "01_sae_concepts.ipynb": """
corr = {n: np.corrcoef(c, held_true.numpy())[0, 1] if c.std() > 0 else 0.0
        for n, c in counts.items()}
assert counts["TopK"].std() == 0 and (counts["TopK"] == K).all(), "TopK gives every sample k"
assert corr["BatchTopK"] > 0.4, corr
found = recovery["found (cos ≥ 0.9)"]
assert found["BatchTopK"] > 0.5 and found["TopK"] > 0.5, found
explorer.sliders["BatchTopK"].value = 2 * explorer.sliders["BatchTopK"].value  # higher θ
assert explorer.counts()["BatchTopK"].mean() < counts["BatchTopK"].mean()
one_sample = [batch_dependence(saes["BatchTopK"], held_x, sample=i, batch_size=32, seed=i)
              for i in range(10)]
modes = [d.groupby("mode")["latents"].agg(lambda s: s.map(tuple).nunique()) for d in one_sample]
assert all(m["threshold"] == 1 for m in modes)  # θ: the same code in any batch
assert any(m["batch"] == 2 for m in modes)  # batch mode: the code depends on the batch
small, crowded = geometry[geometry.active == 1], geometry[geometry.active == 10]
assert (crowded["active_error"].to_numpy() > small["active_error"].max()).all()
print("ok")
""",
    "02_capture_and_train.ipynb": """
import pytest
assert 0 < r["nmse"] < (0.5 if chosen is None else 1.0), r
assert d["ce_recovered_mean"] < d["ce_recovered"]
assert d["intervals"]["ce_recovered"][0] <= d["ce_recovered"]
assert abs(d["ce_sae_plus_error"] - d["ce_clean"]) < 1e-3
if chosen is None:  # what training here gave
    K = S.k
    assert same
    assert abs(s["l0"] - K) / K < 0.25, s["l0"]  # threshold mode: close to k on held-out text
    assert abs(l0_calibrated - K) / K < 0.1
    assert record["l0_after"] == pytest.approx(K, rel=0.01)
    assert d["ce_recovered"] > 0.5
    assert len(monitor.figure.data) == 4 and len(monitor.figure.data[0].x) >= 2
print("ok")
""",
    "03_frontiers.ipynb": """
assert len(main) == 3 * len(KS) and set(main.architecture) == {"batchtopk", "topk", "jumprelu"}
nm = [p["nmse"] for p in prefixes]
assert all(a > b for a, b in zip(nm, nm[1:])), nm  # each larger prefix reconstructs better
for _, r in main.iterrows():
    level = r["k"] if r["architecture"] != "jumprelu" else r["target_l0"]
    # BatchTopK: threshold mode on new text
    tolerance = {"topk": 0.01, "batchtopk": 0.2}.get(r["architecture"], 0.6)
    assert abs(r["l0"] - level) / level < tolerance, r
    assert 0 < r["nmse"] < 0.6 and 0 < r["ce_recovered"] <= 1.01, r
for arch in ("batchtopk", "topk"):  # more latents, better reconstruction
    assert main[main.architecture == arch].sort_values("k")["nmse"].is_monotonic_decreasing, arch
assert len(explorer.detail.data) == 1 and explorer.selected.value.startswith("<b>")
assert {"batchtopk", "topk", "jumprelu"} <= set(full.architecture)
assert len(diffs) == 3 * len(KS)
assert (diffs["lo"] <= diffs["difference"]).all() and (diffs["difference"] <= diffs["hi"]).all()
print("ok")
""",
    "04_adaptive_allocation.ipynb": """
kept_topk = tables["TopK"][tables["TopK"].kept]
kept_bt = tables[MAIN][tables[MAIN].kept]
assert (kept_topk["count"] == K).all()  # TopK: exactly k per token
assert kept_bt["count"].std() > 1  # BatchTopK: variable
assert (l0["TopK"] == K).all()
if SAE is None:  # the course SAE: mean near k with a long tail
    assert abs(l0[MAIN].mean() - K) / K < 0.35 and l0[MAIN].max() > 1.5 * K
assert set(corr.index) >= {"position", "token_frequency", "model_loss", "recon_error"}
assert corr.notna().all()
clicked = explorer.select_token(5)  # what clicking the sixth token of the explorer's text lists
assert abs(clicked["share"].sum() - 1) < 1e-3 and len(clicked) == explorer.table()["count"][5]
explorer.token_buttons.children[0].click()  # ... and its strongest latent opens in the feature view
assert features.latent.value == clicked["latent"][0]
before = explorer.table()["count"].sum()
explorer.threshold.value = explorer.threshold.value * 2  # a higher threshold: fewer latents
assert explorer.table()["count"].sum() < before
assert explorer.errors == [] and features.errors == []
print("ok")
""",
    "05_feature_explorer.ipynb": """
rows, vals = index.activations(latent)
assert len(vals) == round(density[latent] * index.n_tokens) and (vals[:-1] >= vals[1:]).all()
if SAE is None:  # mean L0 near k
    k = course.sizes(MODE).k
    assert abs(sum(index.starts[1:] - index.starts[:-1]) / index.n_tokens - k) / k < 0.35


def fires_on_search(row):
    context = index.context(int(row))
    return SEARCH.lower() in context["tokens"][context["focus"]].lower()


assert hits and all(any(fires_on_search(r) for r in index.activations(h)[0][:10]) for h in hits)
assert set(hits) <= set(index.search_text(SEARCH, n=10**6, where="context"))
assert f"Latent {hits[0]}" in explorer.info.value and len(explorer.hist.data[0].x) > 0
assert effect["kl_next"] >= 0 and len(effect["clean_top"]) == 5 and effect["fired_on"] >= 1
explorer.probe.value = "And the Lord said unto Moses"  # the typed-text probe shades every token
assert explorer.probe_out.value.count("<span") >= 5 and explorer.errors == []
print("ok")
""",
    "06_beyond_reconstruction.ipynb": """
a_rows = {
    n: {d["first_letter"]: d for d in doc["eval_result_details"]} for n, doc in toy_docs.items()
}
assert a_rows["absorbing"]["a"]["mean_absorption_fraction"] > 0.01  # the planted holes are found
assert a_rows["clean"]["a"]["full_absorption_rate"] == 0
assert all(a_rows["absorbing"][c] == a_rows["clean"][c] for c in "bcd")
assert list(table["architecture"]) == ["batchtopk", "topk", "jumprelu", "matryoshka"]
for column in ("absorption", "sae_top_1"):
    assert all(lo <= v <= hi for v, (lo, hi) in zip(table[column], table[column + "_ci"]))
assert set(absorption) == {"batchtopk", "topk", "jumprelu", "matryoshka"}
assert explorer.letter.options and explorer.letter.value in explorer.letter.options
explorer.main_buttons.children[0].click()  # a main latent opens in the feature dashboard
assert features.latent.value == explorer.letter_row()["main_latents"][0]
explorer.sae_choice.value = "topk"  # another SAE: its own letters, no dashboard to open
assert all(b.disabled for b in explorer.main_buttons.children)
explorer.sae_choice.value = "batchtopk"  # back, with its dashboard (the browser test clicks it)
assert not any(b.disabled for b in explorer.main_buttons.children)
assert len(l0["words"]) > 20 and l0["words"]["l0"].gt(0).all()
assert explorer.errors == [] and features.errors == []
print("ok")
""",
}


def with_checks(name: str) -> nbformat.NotebookNode:
    """The committed notebook with its check appended as a last cell."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nb.cells.append(new_code_cell(CHECKS[name].strip()))
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
