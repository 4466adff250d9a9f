"""Activation stores in SAELens's format both ways, tested with the real sae-lens package: a cache
SAELens's own CacheActivationsRunner writes is read as a store (and trained on by `saekit train`),
and a saekit store exported with `saekit export-store --format saelens` is read and trained on by
SAELens's ActivationsStore and SAETrainer."""

import json
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import HOOK

from saekit.activations import (
    SAELensCache,
    StoreError,
    export_store,
    open_store,
    saelens_hook_name,
    store_format,
)
from saekit.cli import main
from saekit.sae import load_sae

D, CTX, BOS = 16, 8, 0


@pytest.fixture(scope="module")
def saelens_cache(tmp_path_factory):
    """A cache written by SAELens's CacheActivationsRunner from a tiny TransformerLens model (no
    hub needed)."""
    import datasets
    import sae_lens.cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    tl = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=D, d_head=4, n_ctx=CTX, d_vocab=50, act_fn="relu"
        )
    )
    toks = torch.randint(1, 50, (48, CTX), generator=torch.Generator().manual_seed(0))
    toks[:, 0] = BOS  # every context starts with the BOS, as SAELens's prepend_bos makes it
    toks[5, 4] = BOS  # and a document separator inside one context
    out = tmp_path_factory.mktemp("saelens") / "cache"
    cfg = CacheActivationsRunnerConfig(
        dataset_path="unused",
        model_name="tiny",
        model_batch_size=4,
        hook_name="blocks.1.hook_resid_post",
        d_in=D,
        training_tokens=48 * CTX,
        context_size=CTX,
        new_cached_activations_path=str(out),
        shuffle=False,
        device="cpu",
        prepend_bos=False,
        streaming=False,
        buffer_size_gb=0.0001,
    )
    with mock.patch.object(car, "load_model", return_value=tl):
        car.CacheActivationsRunner(
            cfg, override_dataset=datasets.Dataset.from_dict({"tokens": toks.tolist()})
        ).run()
    ds = datasets.load_from_disk(str(out)).with_format("numpy")[:]
    return out, ds["blocks.1.hook_resid_post"], ds["token_ids"]


def test_reads_the_cache_saelens_wrote(saelens_cache):
    path, acts, token_ids = saelens_cache
    assert store_format(path) == "saelens-cache"
    st = open_store(path)
    assert isinstance(st, SAELensCache) and st.hooks == ["resid_post.1"] and st.d_model == D
    # BOS positions (the first of each context and the separator) hold no row
    keep = token_ids != BOS
    assert st.manifest["bos_token_id"] == BOS and len(st) == int(keep.sum()) < acts.shape[0] * CTX
    np.testing.assert_array_equal(st.load().numpy(), acts[keep])
    pos = st.positions()
    np.testing.assert_array_equal(st.tokens[pos[:, 0], pos[:, 1]], token_ids[keep])
    assert (st.keep_mask() == keep).all() and (st.doc_ids[~keep] == -1).all()
    # the TransformerLens name opens the same column; batches cover every row once
    same = open_store(path, hook="blocks.1.hook_resid_post").load()
    assert torch.equal(same, st.load())
    got = torch.cat(list(st.batches(64, seed=3, buffer_rows=128, chunk_rows=32)))
    assert torch.equal(got.sort(0).values, st.load().sort(0).values)
    with pytest.raises(StoreError, match="not in SAELens cache.*resid_post.1"):
        open_store(path, hook="resid_post.0")


def test_saekit_trains_on_a_saelens_cache_and_asks_for_the_model(saelens_cache, tmp_path, capsys):
    path = saelens_cache[0]
    rc = main(
        [
            "train",
            "--store",
            str(path),
            "--arch",
            "batchtopk",
            "--k",
            "4",
            "--expansion",
            "2",
            "--tokens",
            "1200",
            "--batch-size",
            "64",
            "--warmup-steps",
            "2",
            "--out",
            str(tmp_path / "tr"),
        ]
    )
    assert rc == 0
    sae = load_sae(tmp_path / "tr" / "batchtopk_k4_32")
    assert sae.cfg.d_in == D and sae.cfg.hook_name == "resid_post.1"
    assert main(["eval", str(tmp_path / "tr" / "batchtopk_k4_32"), "--store", str(path)]) == 2
    assert "does not say which model" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                str(tmp_path / "tr" / "batchtopk_k4_32"),
                "--store",
                str(path),
                "--no-ce",
                "--json",
            ]
        )
        == 0
    )
    m = json.loads(capsys.readouterr().out)
    assert 0 < m["reconstruction"]["nmse"] < 1 and m["n_tokens"] > 300


def test_export_round_trip_and_saelens_trains_from_it(store, model, tmp_path, capsys):
    from sae_lens import BatchTopKTrainingSAEConfig, TrainingSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    out = tmp_path / "exp"
    assert main(["export-store", str(store.path), str(out), "--format", "saelens"]) == 0
    ctx = store.manifest["seq_len"] - 1  # BOS dropped: 63 stored positions per full sequence
    back = open_store(out)
    n = (len(store) // ctx) * ctx
    assert isinstance(back, SAELensCache) and back.hooks == store.hooks and len(back) == n
    for h in store.hooks:
        assert torch.equal(back.load(h), store.load(h)[:n])
    np.testing.assert_array_equal(back.positions(), store.positions()[:n])
    np.testing.assert_array_equal(back.tokens, store.tokens)
    assert back.manifest["model"] == store.manifest["model"]
    # never overwrites without --overwrite
    assert main(["export-store", str(store.path), str(out)]) == 2
    assert "exists" in capsys.readouterr().err

    # SAELens reads it with its own ActivationsStore: the same rows and tokens, in order
    sl = ActivationsStore(
        model=None,
        dataset=None,
        streaming=False,
        hook_name=saelens_hook_name(HOOK),
        hook_head_index=None,
        context_size=ctx,
        d_in=store.d_model,
        n_batches_in_buffer=2,
        total_training_tokens=n,
        store_batch_size_prompts=4,
        train_batch_size_tokens=64,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        cached_activations_path=str(out),
    )
    acts, toks = sl.get_raw_llm_batch()
    assert torch.equal(acts.reshape(4 * ctx, -1), store.rows(0, 4 * ctx, HOOK))
    pos = store.positions()[: 4 * ctx]
    np.testing.assert_array_equal(toks.numpy(), store.tokens[pos[:, 0], pos[:, 1]])
    # ... and SAELens's trainer trains from it
    sae = TrainingSAE.from_dict(
        BatchTopKTrainingSAEConfig(d_in=store.d_model, d_sae=128, k=8, device="cpu").to_dict()
    )
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=64 * 6,
            train_batch_size_samples=64,
            lr_end=3e-5,
            n_batches_for_norm_estimate=2,
        ),
        sae,
        sl,
    )
    w0 = sae.W_enc.detach().clone()
    trainer.fit()
    assert trainer.n_training_steps == 6 and not torch.equal(w0, sae.W_enc)

    # mixing formats needs no flag: an SAE trained on the saekit store evaluates on the SAELens
    # cache, CE included
    assert (
        main(
            [
                "train",
                "--store",
                str(store.path),
                "--hook",
                HOOK,
                "--arch",
                "topk",
                "--k",
                "8",
                "--expansion",
                "1",
                "--tokens",
                "1024",
                "--batch-size",
                "128",
                "--out",
                str(tmp_path / "tr"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "tr" / "topk_k8_576"),
                "--store",
                str(out),
                "--ce-tokens",
                "60",
                "--json",
            ]
        )
        == 0
    )
    m = json.loads(capsys.readouterr().out)
    assert m["downstream"]["ce_sae"] > m["downstream"]["ce_clean"] and m["store"] == str(out)


def test_unknown_or_damaged_folders_say_what_a_store_is(saelens_cache, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="neither format.*saekit store.*SAELens activation cache"):
        open_store(tmp_path / "junk")
    broken = tmp_path / "broken"
    shutil.copytree(saelens_cache[0], broken)
    for f in broken.glob("*.arrow"):
        f.unlink()
    with pytest.raises(StoreError, match="cannot open it"):
        open_store(broken)
    with pytest.raises(StoreError, match="unknown export format"):
        export_store(saelens_cache[0], tmp_path / "x", format="parquet")
