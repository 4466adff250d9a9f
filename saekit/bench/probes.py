"""Linear probes as SAEBench trains them: one-vs-rest logistic probes trained together with Adam
(optionally with an L1 penalty, to rank SAE latents), and k-sparse probes on the k latents an L1
probe ranks highest, fitted by scikit-learn's logistic regression."""

from __future__ import annotations

import numpy as np
import torch


def train_multi_probe(
    x_ND: torch.Tensor,
    labels_N: np.ndarray,
    n_classes: int,
    epochs: int = 50,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    batch_size: int = 4096,
    weight_decay: float = 1e-6,
    l1: float = 0.0,
    seed: int = 42,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic probe per class (one against the rest), trained together: weights [C, D] and
    biases [C]. Each class's positives are weighted by its negatives-to-positives ratio, the
    learning rate decays exponentially from lr to end_lr, and `l1` penalises the mean L1 norm of
    the weights."""
    generator = torch.Generator().manual_seed(seed)
    x_ND = x_ND.float()
    y_NC = torch.nn.functional.one_hot(torch.as_tensor(labels_N), n_classes).float()
    positives_C = y_NC.sum(0)
    pos_weight_C = (len(y_NC) - positives_C) / positives_C.clamp(min=1)
    W_CD = torch.zeros(n_classes, x_ND.shape[1], requires_grad=True)
    b_C = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([W_CD, b_C], lr=lr, weight_decay=weight_decay)
    decay = (end_lr / lr) ** (1 / max(epochs, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight_C)
    for _ in range(epochs):
        for rows in torch.randperm(len(x_ND), generator=generator).split(batch_size):
            logits_BC = x_ND[rows] @ W_CD.T + b_C
            loss = loss_fn(logits_BC, y_NC[rows])
            if l1:
                loss = loss + l1 * W_CD.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return W_CD.detach(), b_C.detach()


def f1(labels_N: np.ndarray, scores_N) -> float:
    """F1 of a probe that says yes where its score is positive."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels_N, np.asarray(scores_N) > 0, zero_division=0.0))


def k_sparse_probe(acts_train_NF: torch.Tensor, y_train_N: np.ndarray, latents: list[int]):
    """A balanced logistic probe on the chosen latents only (scikit-learn's)."""
    from sklearn.linear_model import LogisticRegression

    x = acts_train_NF[:, latents].double().numpy()
    return LogisticRegression(max_iter=500, class_weight="balanced").fit(x, y_train_N)


def k_sparse_f1s(
    acts_train_NF: torch.Tensor,
    y_train_N: np.ndarray,
    acts_test_NF: torch.Tensor,
    y_test_N: np.ndarray,
    ranking: torch.Tensor,
    max_k: int,
) -> tuple[list[float], list[list[int]]]:
    """Test F1 of k-sparse probes on the top k latents of `ranking` (a weight per latent), for k =
    1..max_k, with the latents each used."""
    f1s, chosen = [], []
    for k in range(1, max_k + 1):
        latents = ranking.topk(k).indices.tolist()
        if len(set(y_train_N.tolist())) < 2:  # one class only: no probe can be fitted
            f1s.append(0.0)
        else:
            probe = k_sparse_probe(acts_train_NF, y_train_N, latents)
            f1s.append(f1(y_test_N, probe.decision_function(acts_test_NF[:, latents].double())))
        chosen.append(latents)
    return f1s, chosen


def split_latents(f1s: list[float], chosen: list[list[int]], jump: float = 0.03) -> list[int]:
    """SAEBench's feature splitting: grow k while each step raises F1 by more than `jump`; the
    latents of the last k that did."""
    best, split = -100.0, []
    for score, latents in zip(f1s, chosen):
        if score > best + jump:
            best, split = score, latents
        else:
            break
    return split
