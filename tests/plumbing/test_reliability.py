"""The reliability promises through the library: honest splits of local corpora, one writer per
folder, shards of another capture never folded in, SAE and data checked against each other, settings
validated, and a checkpoint resumed only by the run that made it."""

import json

import pytest
import torch
from conftest import HOOK

from saekit.activations import ActivationStore, StoreError, capture
from saekit.data import LOCAL_TEST_FRACTION, CorpusError, load_corpus, packed_corpus
from saekit.plumbing.checks import (
    DataMismatchError,
    NonFiniteError,
    hook_on_model,
    hook_on_store,
    require_finite,
)
from saekit.plumbing.locks import LockError, writer_lock
from saekit.sae import SAEConfig, make_sae
from saekit.train import TrainConfig, TrainingError, train


def _texts(ds):
    return set(ds["text"])


def test_a_local_file_is_split_by_document_and_the_splits_are_disjoint(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(200)))
    train_, test, whole = (_texts(load_corpus(str(f), split=s)) for s in ("train", "test", "all"))
    assert train_.isdisjoint(test)
    assert train_ | test == whole and len(whole) == 200
    assert len(test) == round(200 * LOCAL_TEST_FRACTION)
    assert _texts(load_corpus(str(f), split="test")) == test  # the same line every time
    with pytest.raises(CorpusError, match="no splits of its own.*'dev'"):
        load_corpus(str(f), split="dev")


def test_the_split_rule_is_recorded_in_the_store(tmp_path, model):
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(f"Paragraph {i} has a few words in it." for i in range(60)))
    packed = packed_corpus(model.tokenizer, str(f), split="test", seq_len=32)
    store = capture(model, packed, HOOK, tmp_path / "store", progress=False)
    rule = store.manifest["corpus"]["split_rule"]
    assert rule["method"] == "seeded document split" and rule["n_test"] == 6
    assert store.manifest["corpus"]["split"] == "test"


def test_files_or_a_column_define_the_splits_where_they_can(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, n in (("train", 8), ("test", 3)):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": f"{split} {i}"}) + "\n" for i in range(n))
        )
    assert _texts(load_corpus(str(folder), split="test")) == {f"test {i}" for i in range(3)}
    assert len(load_corpus(str(folder), split="all")) == 11
    with pytest.raises(CorpusError, match="no 'validation' split.*test, train"):
        load_corpus(str(folder), split="validation")
    (folder / "extra.jsonl").write_text(json.dumps({"text": "loose"}) + "\n")
    with pytest.raises(CorpusError, match="some files are named by split"):
        load_corpus(str(folder), split="train")
    col = tmp_path / "col.jsonl"
    col.write_text(
        "".join(
            json.dumps({"text": f"t{i}", "split": "train" if i % 3 else "test"}) + "\n"
            for i in range(12)
        )
    )
    assert _texts(load_corpus(str(col), split="test")) == {"t0", "t3", "t6", "t9"}
    with pytest.raises(CorpusError, match="`split` column holds test, train"):
        load_corpus(str(col), split="dev")


def test_one_writer_per_folder(tmp_path):
    with writer_lock(tmp_path / "store", "capture"):
        with writer_lock(tmp_path / "store", "capture"):  # the same job again: it re-enters
            pass
    with writer_lock(tmp_path / "store", "capture"):  # released, so taken again
        info = json.loads((tmp_path / "store" / ".saekit.lock").read_text())
        assert info["job"] == "capture" and info["pid"] > 0


def test_a_lock_held_elsewhere_is_named(tmp_path):
    from bad_input import holding_lock, release

    first = holding_lock(tmp_path / "store")
    try:
        with pytest.raises(LockError, match=f"being written by process {first.pid} on "):
            with writer_lock(tmp_path / "store", "capture"):
                pass
    finally:
        release(first)


def test_a_completion_record_of_other_tokens_is_not_folded(model, packed, tmp_path):
    out = tmp_path / "store"
    store = capture(
        model, packed.head(8), HOOK, out, batch_size=8, shard_tokens=128, progress=False
    )
    n = len(store.shards)
    manifest = json.loads((out / "manifest.json").read_text())
    last = manifest["shards"][-1]["index"]
    record = json.loads((out / "shards" / f"{last:05d}.done.json").read_text())
    (out / "shards" / f"{last:05d}.done.json").write_text(
        json.dumps({**record, "tokens_sha256": "f" * 64})
    )
    manifest.update(shards=manifest["shards"][:-1], complete=False)
    (out / "manifest.json").write_text(json.dumps(manifest))
    from saekit.activations.resume import fold_done

    folded = fold_done(out, manifest, n)
    assert len(folded["shards"]) == n - 1 and not folded["complete"]
    again = capture(
        model, packed.head(8), HOOK, out, batch_size=8, shard_tokens=128, progress=False
    )
    # the foreign shard was captured again
    assert again.manifest["complete"] and len(again.shards) == n


def test_the_sae_and_its_data_are_checked_against_each_other(store, model):
    sae = make_sae(
        arch="batchtopk",
        d_in=576,
        d_sae=1152,
        k=8,
        hook_name=HOOK,
        model_name=store.manifest["model"],
    )
    assert hook_on_store(sae, store) == HOOK
    assert hook_on_model(sae, model) == HOOK
    with pytest.raises(DataMismatchError, match=f"trained at '{HOOK}'.*'mlp_out.3'"):
        hook_on_store(sae, store, "mlp_out.3")
    assert hook_on_store(sae, store, "mlp_out.3", allow_mismatch=True) == "mlp_out.3"
    with pytest.raises(DataMismatchError, match="no activations at the hook asked for 'mlp_out.4'"):
        # never a fallback, even on purpose
        hook_on_store(sae, store, "mlp_out.4", allow_mismatch=True)
    other = make_sae(arch="batchtopk", d_in=576, d_sae=1152, k=8, hook_name=HOOK, model_name="gpt2")
    with pytest.raises(DataMismatchError, match="model 'gpt2'"):
        hook_on_store(other, store)
    with pytest.raises(DataMismatchError, match="model 'gpt2'"):
        hook_on_model(other, model)
    narrow = make_sae(arch="batchtopk", d_in=64, d_sae=128, k=4, hook_name=HOOK)
    with pytest.raises(DataMismatchError, match="d_in=64"):
        hook_on_store(narrow, store, allow_mismatch=True)
    from saekit.analysis import latent_counts

    with pytest.raises(DataMismatchError, match="model 'gpt2'"):
        latent_counts(other, model, "Some text.")


def test_non_finite_rows_are_named_by_shard_and_row(store):
    x = store.rows(0, 10).float()
    require_finite(x, store, 0)
    x[7, 2] = float("inf")
    start = store.shards[0]["n_rows"] - 3  # rows that cross into the second shard
    with pytest.raises(NonFiniteError, match=f"shard {store.shards[1]['index']:05d}, row 4 "):
        require_finite(x, store, start)
    with pytest.raises(NonFiniteError, match="row 7 of the text"):
        require_finite(x, what="the text")


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("total_tokens", -5),
        ("lr", -1.0),
        ("lr", 0.0),
        ("checkpoint_every", -1),
        ("decay_frac", 1.5),
        ("keep_checkpoints", 0),
    ],
)
def test_training_settings_are_validated(field, value):
    with pytest.raises(TrainingError, match=f"{field}={value!r}"):
        TrainConfig(**{field: value})


def test_resume_names_every_difference(tmp_path):
    x = torch.randn(1024, 16)
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=4)
    tc = dict(total_tokens=512, batch_size=128, warmup_steps=1, checkpoint_every=2, progress=False)
    train(x, cfg, TrainConfig(**tc), out=tmp_path)
    with pytest.raises(TrainingError, match="seed: 0 then, 3 now; --batch-size: 128 then, 64 now"):
        train(x, cfg, TrainConfig(**{**tc, "seed": 3, "batch_size": 64}), out=tmp_path)
    with pytest.raises(TrainingError, match=r"the training data: tensor \[1024, 16\]"):
        train(x + 1, cfg, TrainConfig(**tc), out=tmp_path)
    with pytest.raises(TrainingError, match="SAE 0's k: 4 then, 5 now"):
        train(
            x, SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=5), TrainConfig(**tc), out=tmp_path
        )
    # the same run resumes (here: it had finished)
    res = train(x, cfg, TrainConfig(**tc), out=tmp_path)
    assert res.steps == 4


def test_a_store_without_the_sae_hook_and_several_hooks_needs_one_named(store):
    sae = make_sae(arch="batchtopk", d_in=576, d_sae=1152, k=8)  # records no hook
    with pytest.raises(DataMismatchError, match="does not record its hook"):
        hook_on_store(sae, store)
    assert hook_on_store(sae, store, "mlp_out.3") == "mlp_out.3"
    with pytest.raises(StoreError, match="hook 'nonexistent' is not in store"):
        ActivationStore(store.path, "nonexistent")


@pytest.mark.parametrize(
    "field, value",
    [
        ("k_aux", 0),
        ("dead_tokens", 0),
        ("threshold_beta", 1.0),
        ("l1_coeff", -1.0),
        ("target_l0", 0.0),
        ("jumprelu_bandwidth", 0.0),
    ],
)
def test_sae_settings_are_validated(field, value):
    from saekit.sae import SAEConfigError

    with pytest.raises(SAEConfigError, match=f"{field}={value!r}"):
        SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=4, **{field: value})


def test_evaluations_of_other_tokens_never_pair(store, model, tokenizer):
    from saekit.metrics import EvaluationError, compare_lines, evaluate, mismatches

    sae = make_sae(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK).eval()
    on_store = evaluate(sae, None, store, n_tokens=400)
    held_out = packed_corpus(tokenizer, split="test", seq_len=64, max_tokens=400)
    on_text = evaluate(sae, model, held_out, n_tokens=400, ce_tokens=64)
    assert on_text["data"]["tokens_sha256"] == held_out.sha256()
    differ = mismatches(on_store, on_text)
    assert any(d.startswith("data tokens_sha256:") for d in differ), differ
    assert any(d.startswith("data kind: store in A, tokens in B") for d in differ), differ
    with pytest.raises(EvaluationError, match="do not pair up"):
        compare_lines(on_store, on_text, ("a", "b"))
    assert mismatches(on_store, evaluate(sae, None, store, n_tokens=200)) == []


def test_another_tools_cfg_json_needs_a_whole_k(tmp_path):
    from saekit.sae import SAEConfigError, load_sae

    sae = make_sae(arch="topk", d_in=16, d_sae=32, k=4)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["saekit"]  # as SAELens writes it
    cfg["k"] = 4.5
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match=r"cfg.json: field 'k' is 4.5; expected a whole"):
        load_sae(tmp_path)
    cfg["k"] = 4.0
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(tmp_path).cfg.k == 4
