"""Sparse probing, truth first: a label carried by one planted feature is found by a one-latent
probe on an SAE that has a latent for that feature, and a label no feature carries is not; then
the tasks on the bundled corpus keep every document on one side of the split."""

import numpy as np
import pandas as pd
import pytest
import torch

from saekit.bench import ProbingConfig, sparse_probing_eval
from saekit.bench.probing import top_k_by_mean_difference
from saekit.bench.tasks import ProbingData, Task, task_rows
from saekit.sae import make_sae

D, T, N_DOCS = 16, 12, 200


def _planted(seed=0):
    """Documents labelled "planted" or "other" (half each) and, independently, "heads" or
    "tails". Each document is one context of T tokens made of random orthonormal features; in the
    planted documents feature 0 is on in a third of the tokens."""
    rng = np.random.default_rng(seed)
    features = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))[
        0
    ].T
    planted = rng.random(N_DOCS) < 0.5
    coins = rng.random(N_DOCS) < 0.5
    on = rng.random((N_DOCS, T, D)) < 0.15
    on[:, :, 0] = planted[:, None] & (rng.random((N_DOCS, T)) < 0.33)
    x = torch.from_numpy(on * rng.uniform(0.5, 1.5, on.shape)).float() @ features
    keep = np.ones((N_DOCS, T), bool)
    docs = pd.DataFrame(
        {
            "author": np.where(planted, "planted", "other"),
            "genre": np.where(coins, "heads", "tails"),
            "title": [f"d{i}" for i in range(N_DOCS)],
        }
    )
    docs["work"] = docs["title"]
    data = ProbingData(
        tokens=np.zeros((N_DOCS, T), np.int64),
        keep=keep,
        doc=np.arange(N_DOCS),
        tokens_x=x.numpy().astype(np.float16),
        pooled=x.mean(1),
        docs=docs,
        test_doc=rng.random(N_DOCS) < 0.3,
    )
    sae = make_sae(arch="relu", d_in=D, d_sae=D, normalize="none", l1_coeff=1e-3)
    sae.set_weights(
        {"W_enc": features.T, "W_dec": features, "b_enc": torch.zeros(D), "b_dec": torch.zeros(D)}
    )
    return data, sae.eval()


TASKS = [
    Task("planted", "planted feature", {"author": ["planted"]}),
    Task("coin", "coin toss", {"genre": ["heads"]}),
]


def test_a_planted_feature_is_found_by_one_latent_and_a_coin_toss_is_not():
    data, sae = _planted()
    cfg = ProbingConfig(k_values=[1, 2, 5])
    doc = sparse_probing_eval(sae, data, cfg, progress=False, tasks=TASKS)
    by_set = {d["dataset_name"]: d for d in doc["eval_result_details"]}
    assert by_set["planted"]["sae_top_1_test_accuracy"] > 0.95
    assert 0.3 < by_set["coin"]["sae_top_1_test_accuracy"] < 0.7
    assert 0.3 < by_set["coin"]["llm_test_accuracy"] < 0.7
    pooled_codes = torch.relu(data.pooled @ sae.W_enc.detach())
    train, _ = task_rows(TASKS[0], data, cfg)
    assert top_k_by_mean_difference(
        pooled_codes[train], data.labels(TASKS[0], train), 1
    ).tolist() == [0]
    mean = doc["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"]
    assert mean == pytest.approx(
        (by_set["planted"]["sae_top_1_test_accuracy"] + by_set["coin"]["sae_top_1_test_accuracy"])
        / 2
    )
    per_doc = doc["eval_result_unstructured"]["tasks"]["planted feature"]["per_document"][
        "sae_top_1"
    ]
    assert set(per_doc["doc"]) <= set(np.nonzero(data.test_doc)[0].tolist())


def test_tasks_on_the_bundled_corpus_keep_documents_on_one_side(tokenizer):
    from saekit.bench.tasks import TASKS as CORPUS_TASKS
    from saekit.bench.tasks import contexts, documents

    docs = documents(None)
    tokens, keep, doc = contexts(tokenizer, docs, 64, 2)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all() and not keep[:, 0].any()
    data = ProbingData(
        tokens, keep, doc, None, None, docs, np.random.default_rng(0).random(len(docs)) < 0.2
    )
    cfg = ProbingConfig()
    for task in CORPUS_TASKS:
        train, test = task_rows(task, data, cfg)
        assert not set(doc[train]) & set(doc[test]), task.name
        for rows in (train, test):
            y = data.labels(task, rows)
            assert y.sum() * 2 == len(y), task.name  # balanced
        if task.negative is not None:  # one work against another: nothing else
            assert data.matches({**task.positive})[train].sum() + data.matches(task.negative)[
                train
            ].sum() == len(train)
