"""`saekit bench` at a small size on two SAEs that share a hook: every output validates against the
schema SAEBench ships in its sae-bench 0.6.0 wheel, core's figures agree with saekit's own where
their definitions coincide, a second run reuses what the first wrote, and the summary has
intervals."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import HOOK

from saekit.bench import (
    AbsorptionConfig,
    CoreConfig,
    ProbingConfig,
    bench,
    core_eval,
    format_table,
)
from saekit.bench.output import EVAL_TYPES

WHEEL = "sae-bench==0.6.0"
SCHEMAS = {
    "core": "sae_bench/evals/core/eval_output_schema_core.json",
    "absorption": "sae_bench/evals/absorption/eval_output_schema_absorption_first_letter.json",
    "sparse-probing": "sae_bench/evals/sparse_probing/eval_output_schema_sparse_probing.json",
}
SMALL = dict(
    core_config=CoreConfig(
        model_name="SmolLM2-135M-Instruct",
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        context_size=64,
    ),
    absorption_config=AbsorptionConfig(
        model_name="SmolLM2-135M-Instruct", max_words=520, min_words_per_letter=5
    ),
    probing_config=ProbingConfig(
        model_name="SmolLM2-135M-Instruct", context_length=64, contexts_per_document=1
    ),
)


@pytest.fixture(scope="module")
def schemas(request):
    """The three output schemas, read from the sae-bench wheel (downloaded once into pytest's
    cache; sae-bench itself is not installed: it pins numpy<2 and datasets<4)."""
    folder = request.config.cache.mkdir("sae-bench-wheel")
    wheels = list(folder.glob("sae_bench-0.6.0-*.whl"))
    if not wheels:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(folder)],
            capture_output=True,
            text=True,
        )
        wheels = list(folder.glob("sae_bench-0.6.0-*.whl"))
        assert wheels, (
            f"the {WHEEL} wheel, whose schemas these outputs are checked against, could not be "
            f"downloaded from the package index:\n{done.stderr[-2000:]}"
        )
    with zipfile.ZipFile(wheels[0]) as z:
        return {name: json.loads(z.read(path)) for name, path in SCHEMAS.items()}


@pytest.fixture(scope="module")
def two_saes(sae_dir, store, tmp_path_factory):
    """The shared BatchTopK SAE and a TopK SAE trained on the same store."""
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train

    cfg = SAEConfig(
        arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK, model_name=store.manifest["model"]
    )
    res = train(
        store,
        cfg,
        TrainConfig(total_tokens=2048, batch_size=256, warmup_steps=2, progress=False),
        out=tmp_path_factory.mktemp("topk_sae"),
    )
    return [sae_dir, res.out / res.names[0]]


@pytest.fixture(scope="module")
def ran(two_saes, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    table = bench(two_saes, out=out, progress=False, **SMALL)
    return out, table


def test_every_output_validates_against_saebench_schemas(ran, two_saes, schemas):
    import jsonschema

    out, _ = ran
    for eval_name, type_id in EVAL_TYPES.items():
        files = sorted((out / type_id).glob("*_eval_results.json"))
        assert [f.name for f in files] == sorted(f"{d.name}_eval_results.json" for d in two_saes)
        for f in files:
            doc = json.loads(f.read_text())
            jsonschema.validate(doc, schemas[eval_name])
            assert doc["eval_type_id"] == type_id
            assert doc["eval_result_details"], f"{f.name} has no per-item details"


def test_core_agrees_with_saekit_where_the_definitions_coincide(ran, two_saes, model):
    """SAEBench's L0, CE loss score (zero ablation) and KL are saekit's; its explained variance
    is not saekit's 1 - FVU, and both are reported."""
    import torch

    from saekit.activations import forward_hooks
    from saekit.data import packed_corpus
    from saekit.metrics import ce_metrics, reconstruction_metrics
    from saekit.models import resolve_hook
    from saekit.sae import load_sae

    out, _ = ran
    cfg = SMALL["core_config"]
    n = cfg.batch_size_prompts * cfg.n_eval_reconstruction_batches
    packed = packed_corpus(
        model.tokenizer, split="test", seq_len=cfg.context_size, max_tokens=n * cfg.context_size
    )
    sae = load_sae(two_saes[0])
    doc = json.loads((out / "core" / f"{two_saes[0].name}_eval_results.json").read_text())
    m = doc["eval_result_metrics"]
    ids = torch.from_numpy(packed.tokens[:n].astype(np.int64))
    x = forward_hooks(model, ids, [resolve_hook(model, HOOK)])[0][torch.from_numpy(packed.keep[:n])]
    rec = reconstruction_metrics(sae, [x])
    assert m["sparsity"]["l0"] == pytest.approx(rec["l0"], rel=1e-5)
    own = doc["eval_result_unstructured"]["saekit"]["explained_variance"]
    assert own == pytest.approx(1 - rec["fvu"], rel=1e-4)
    assert own != pytest.approx(m["reconstruction_quality"]["explained_variance"], rel=1e-3)
    ce = ce_metrics(sae, model, packed.tokens[:n], packed.keep[:n], seq_batch=4)
    perf = m["model_performance_preservation"]
    assert perf["ce_loss_score"] == pytest.approx(ce["ce_recovered"], rel=1e-4)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(ce["kl"], rel=1e-4)
    assert perf["ce_loss_with_ablation"] > perf["ce_loss_with_sae"] > perf["ce_loss_without_sae"]
    density = np.array([d["feature_density"] for d in doc["eval_result_details"]])
    assert density.sum() == pytest.approx(m["sparsity"]["l0"], rel=1e-4)  # each token's latents


def test_one_pass_serves_several_saes_and_a_rerun_reuses_it(ran, two_saes, monkeypatch):
    out, table = ran
    assert list(table["sae"]) == [d.name for d in two_saes]
    assert set(table["architecture"]) == {"batchtopk", "topk"}
    for column in ("ce_loss_score", "absorption", "sae_top_1"):
        for value, (lo, hi) in zip(table[column], table[f"{column}_ci"]):
            assert lo <= value <= hi, column
    text = format_table(table)
    assert "absorption" in text and "[" in text
    assert len(list((out / "cache").glob("letters_*.npy"))) == 1  # one capture, two SAEs
    assert len(list((out / "cache").glob("probing_*.npy"))) == 1

    import saekit.bench.run as run

    def refuse(*a, **k):
        raise AssertionError("computed again")

    for name in ("_run_core", "_run_absorption", "_run_probing"):
        monkeypatch.setattr(run, name, refuse)
    again = bench(two_saes, out=out, progress=False, **SMALL)
    assert again.drop(columns=[c for c in again if c.endswith("_ci")]).equals(
        table.drop(columns=[c for c in table if c.endswith("_ci")])
    )


def test_core_takes_saes_of_one_hook_only(two_saes, model):
    from saekit.sae import load_sae

    a, b = (load_sae(d) for d in two_saes)
    b.cfg.hook_name = "resid_post.3"
    with pytest.raises(ValueError, match="SAEs of one hook"):
        core_eval([a, b], model, np.zeros((1, 8), int), np.ones((1, 8), bool))
