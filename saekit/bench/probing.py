"""SAEBench's sparse probing on the bundled corpus: balanced binary tasks built from the documents'
labels (author, genre, work, verse or prose), split by document. Each context's activations are
mean-pooled over its tokens; logistic probes read the model's activations (all dimensions, and the
top k by mean difference) and the SAE's latents (all, and the top k by mean difference)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..sae import SAE
from .output import eval_output
from .tasks import TASKS, ProbingData, Task, task_rows

K_VALUES = (1, 2, 5, 10, 20, 50)


@dataclass(frozen=True)
class ProbingConfig:
    """SAEBench's SparseProbingEvalConfig fields, plus how contexts are cut from documents."""

    random_seed: int = 42
    dataset_names: list[str] = field(default_factory=lambda: sorted({t.dataset for t in TASKS}))
    probe_train_set_size: int = 4000
    probe_test_set_size: int = 1000
    context_length: int = 128
    sae_batch_size: int = 125
    llm_batch_size: int = 8
    llm_dtype: str = "float32"
    model_name: str = ""
    k_values: list[int] = field(default_factory=lambda: list(K_VALUES))
    lower_vram_usage: bool = False
    contexts_per_document: int = 3
    test_fraction: float = 0.2


def top_k_by_mean_difference(x_ND: torch.Tensor, y_N: np.ndarray, k: int) -> torch.Tensor:
    """The k dimensions whose mean differs most between the two classes (SAEBench's selection)."""
    y = torch.from_numpy(y_N.astype(bool))
    diff_D = (x_ND[y].mean(0) - x_ND[~y].mean(0)).abs()
    return diff_D.argsort(descending=True)[:k]


def probe_accuracy(
    x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray
) -> tuple[float, np.ndarray]:
    """Test accuracy of an L2 logistic probe (and whether each test context was right)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=1000).fit(x_train.double().numpy(), y_train)
    right = probe.predict(x_test.double().numpy()) == y_test
    return float(right.mean()), right


@torch.no_grad()
def sae_pooled(sae: SAE, data: ProbingData, batch: int = 16) -> torch.Tensor:
    """Each context's SAE code, mean-pooled over its kept tokens: [n_contexts, d_sae]."""
    was = sae.training
    sae.eval()
    device = next(sae.parameters()).device
    out = torch.empty(len(data.keep), sae.cfg.d_sae)
    try:
        for b in range(0, len(data.keep), batch):
            keep = torch.from_numpy(data.keep[b : b + batch])
            x = torch.from_numpy(np.asarray(data.tokens_x[b : b + batch], dtype=np.float32))
            z = sae(x[keep].to(device)).z.float().cpu()
            rows = torch.repeat_interleave(torch.arange(len(keep)), keep.sum(1))
            sums = torch.zeros(len(keep), z.shape[1]).index_add_(0, rows, z)
            out[b : b + len(keep)] = sums / keep.sum(1, keepdim=True).clamp(min=1)
    finally:
        sae.train(was)
    return out


def _task_accuracies(task: Task, data: ProbingData, sae_x: torch.Tensor, cfg) -> dict:
    train, test = task_rows(task, data, cfg)
    y_train, y_test = data.labels(task, train), data.labels(task, test)
    llm_train, llm_test = data.pooled[train], data.pooled[test]
    acc, right = probe_accuracy(llm_train, y_train, llm_test, y_test)
    result = {"llm_test_accuracy": acc}
    correct = {"llm": right}
    for k in cfg.k_values:
        dims = top_k_by_mean_difference(llm_train, y_train, k)
        result[f"llm_top_{k}_test_accuracy"] = probe_accuracy(
            llm_train[:, dims], y_train, llm_test[:, dims], y_test
        )[0]
    sae_train, sae_test = sae_x[train], sae_x[test]
    result["sae_test_accuracy"] = probe_accuracy(sae_train, y_train, sae_test, y_test)[0]
    for k in cfg.k_values:
        latents = top_k_by_mean_difference(sae_train, y_train, k)
        acc, right = probe_accuracy(sae_train[:, latents], y_train, sae_test[:, latents], y_test)
        result[f"sae_top_{k}_test_accuracy"] = acc
        correct[f"sae_top_{k}"] = right
    per_doc = {name: _by_document(data.doc[test], right) for name, right in correct.items()}
    return {
        "accuracies": result,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "per_document": per_doc,
    }


def _by_document(doc_N: np.ndarray, right_N: np.ndarray) -> dict:
    """Right and total test contexts per document: what a bootstrap over documents resamples."""
    docs, counts = np.unique(doc_N, return_counts=True)
    rights = np.bincount(np.searchsorted(docs, doc_N), weights=right_N, minlength=len(docs))
    return {"doc": docs.tolist(), "right": rights.astype(int).tolist(), "n": counts.tolist()}


def sparse_probing_eval(
    sae: SAE,
    data: ProbingData,
    config: ProbingConfig | None = None,
    progress: bool = True,
    tasks: list[Task] | None = None,
) -> dict:
    """SAEBench's sparse_probing output for `sae` on probing_data at the SAE's hook: per data set
    (a group of tasks), the mean test accuracy of each probe over its tasks; the per-task figures
    and per-document counts in eval_result_unstructured. `tasks`: the bundled corpus's tasks of
    the config's data sets unless given."""
    cfg = config or ProbingConfig()
    sae_x = sae_pooled(sae, data)
    tasks = tasks or [t for t in TASKS if t.dataset in cfg.dataset_names]
    per_task = {}
    for task in tqdm(tasks, desc="sparse probing: tasks", disable=not progress):
        per_task[task.name] = {"dataset": task.dataset, **_task_accuracies(task, data, sae_x, cfg)}
    details = []
    for dataset in dict.fromkeys(t.dataset for t in tasks):
        runs = [r["accuracies"] for r in per_task.values() if r["dataset"] == dataset]
        means = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        details.append({"dataset_name": dataset, **means})
    keys = details[0].keys() - {"dataset_name"}
    mean = {k: float(np.mean([d[k] for d in details])) for k in keys}
    metrics = {
        "llm": {k: v for k, v in mean.items() if k.startswith("llm_")},
        "sae": {k: v for k, v in mean.items() if k.startswith("sae_")},
    }
    unstructured = {
        "tasks": per_task,
        # the single token whose presence best separates each task's classes, and how well
        "one_token_separators": {
            t.name: {
                "token": data.separators[t.name][0],
                "balanced_accuracy": data.separators[t.name][1],
            }
            for t in tasks
            if t.name in data.separators
        },
    }
    return eval_output("sparse-probing", sae, asdict(cfg), metrics, details, unstructured)
