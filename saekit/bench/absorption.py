"""SAEBench's first-letter feature absorption (Chanin et al. 2024). A probe on the model's
activations finds each letter's direction; k-sparse probing on the SAE's latents finds the
letter's main latent and its splits; a word is absorbed when the letter's probe fires on it but
its main latents do not, and other latents aligned with the probe carry the projection instead."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..sae import SAE
from .letters import LETTERS, TEMPLATE, LetterData
from .output import eval_output
from .probes import f1, k_sparse_f1s, split_latents, train_multi_probe

# the thresholds SAEBench's absorption calculator uses
FULL_ABSORPTION_COS = 0.025  # the top projecting latent's cosine with the probe, at least
FRACTION_COS = 0.1  # a possible absorber's cosine with the probe, at least
PROJECTION_SHARE = 0.4  # share of the probe projection the absorbers must carry, at least
MAX_ABSORBERS = 3  # latents that may together make up for the main latents
TOP_LATENTS = 10
LETTER_PROBE_BATCH = 64  # SAEBench trains its letter probe in batches of 64


@dataclass(frozen=True)
class AbsorptionConfig:
    """SAEBench's AbsorptionEvalConfig fields, plus the sample size saekit draws (max_words)."""

    model_name: str = ""
    random_seed: int = 42
    f1_jump_threshold: float = 0.03
    max_k_value: int = 10
    prompt_template: str = TEMPLATE
    prompt_token_pos: int = -6
    llm_batch_size: int = 32
    llm_dtype: str = "float32"
    k_sparse_probe_l1_decay: float = 0.01
    # SAEBench's 4096 over a vocabulary ten times larger: about as many steps as 256 here
    k_sparse_probe_batch_size: int = 256
    k_sparse_probe_num_epochs: int = 50
    min_GT_probe_f1: float = 0.6
    min_feats_for_eval: int = 20
    eval_k_sparse_probe_batch_size: int = 24
    precalc_k_sparse_probe_sae_acts: bool = True
    max_words: int = 3900
    min_words_per_letter: int = 20


def word_absorption(
    x_D: torch.Tensor,
    z_F: torch.Tensor,
    probe_D: torch.Tensor,
    cos_F: torch.Tensor,
    main: list[int],
) -> dict:
    """One word's absorption, as SAEBench scores it. x_D: the activation in the SAE's input space
    (normalised as the SAE sees it), z_F: its code, probe_D: the letter's unit probe direction,
    cos_F: each latent's decoder cosine with it, main: the letter's main (split) latents."""
    proj_F = z_F * cos_F  # each latent's share of the probe projection
    total = float(x_D @ probe_D)
    on_main = float(proj_F[main].sum())
    candidate_F = (cos_F >= FRACTION_COS) & (proj_F > 0)
    candidate_F[main] = False
    absorbers = proj_F[candidate_F].topk(min(MAX_ABSORBERS, int(candidate_F.sum()))).values
    absorbed = float(absorbers.sum())
    share = absorbed / total if total > 0 else 0.0
    if on_main >= total or share < PROJECTION_SHARE:
        fraction = 0.0
    elif on_main <= 0.0:
        fraction = 1.0
    else:
        part = min(absorbed, total - on_main)
        fraction = float(np.clip(part / (part + on_main), 0.0, 1.0))
    top = proj_F.topk(min(TOP_LATENTS, len(proj_F))).indices
    full = (
        bool((z_F[main] < 1e-8).all())
        and float(cos_F[top[0]]) >= FULL_ABSORPTION_COS
        and total > 0
        and float(proj_F[top[0]]) / total >= PROJECTION_SHARE
    )
    return {"absorption_fraction": fraction, "is_full_absorption": full, "top_latent": int(top[0])}


@torch.no_grad()
def _codes(sae: SAE, x_ND: torch.Tensor, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(the inputs as the SAE sees them, normalised; their codes), in threshold mode."""
    was = sae.training
    sae.eval()
    device = next(sae.parameters()).device
    try:
        xs, zs = [], []
        for part in x_ND.split(batch):
            part = part.to(device)
            xs.append(sae.normalize_input(part)[0].float().cpu())
            zs.append(sae(part).z.float().cpu())
    finally:
        sae.train(was)
    return torch.cat(xs), torch.cat(zs)


def absorption_eval(
    sae: SAE, data: LetterData, config: AbsorptionConfig | None = None, progress: bool = True
) -> dict:
    """SAEBench's absorption_first_letter output for `sae` on the first-letter data (letter_data
    at the SAE's hook). Per letter whose model probe reaches min_GT_probe_f1: the mean absorption
    fraction and full-absorption rate over the test words the probe finds, and the split latents."""
    cfg = config or AbsorptionConfig()
    x_train, y_train = data.split(train=True)
    x_test, y_test = data.split(train=False)
    n_classes = len(LETTERS)
    W_probe, b_probe = train_multi_probe(
        x_train, y_train, n_classes, batch_size=LETTER_PROBE_BATCH, seed=cfg.random_seed
    )
    probe_scores = (x_test @ W_probe.T + b_probe).numpy()
    xs_train, z_train = _codes(sae, x_train)
    xs_test, z_test = _codes(sae, x_test)
    W_l1, _ = train_multi_probe(
        z_train, y_train, n_classes, l1=cfg.k_sparse_probe_l1_decay,
        epochs=cfg.k_sparse_probe_num_epochs, batch_size=cfg.k_sparse_probe_batch_size,
        seed=cfg.random_seed,
    )  # fmt: skip
    probes = _Probes(
        cfg,
        W_probe,
        probe_scores,
        W_l1,
        (z_train, y_train),
        (xs_test, z_test, y_test),
        torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=-1),
        [w for w, t in zip(data.words, data.train) if not t],
    )
    letters, words = [], []
    for i in tqdm(sorted(set(y_test.tolist())), desc="absorption: letters", disable=not progress):
        row, scored = probes.letter(i)
        letters.append(row)
        words += scored
    table = pd.DataFrame(letters)
    kept = table[table["probe_f1"] > cfg.min_GT_probe_f1]
    metrics = {"mean": _mean_metrics(kept)}
    details = [
        {k: row[k] for k in _DETAIL_KEYS}
        for row in letters
        if row["probe_f1"] > cfg.min_GT_probe_f1
    ]
    unstructured = {
        "letters": letters,
        "words": words,
        "letters_below_min_f1": table.loc[
            table["probe_f1"] <= cfg.min_GT_probe_f1, "first_letter"
        ].tolist(),
        "letters_skipped_for_too_few_words": data.skipped,
        "n_words": {"train": int(data.train.sum()), "test": int((~data.train).sum())},
    }
    return eval_output("absorption", sae, asdict(cfg), metrics, details, unstructured)


@dataclass
class _Probes:
    """What every letter's absorption is measured with: the model's letter probes and their test
    scores, the L1 probes on the SAE's codes, the codes, the unit decoder rows, the test words."""

    cfg: AbsorptionConfig
    W_probe: torch.Tensor
    probe_scores: np.ndarray
    W_l1: torch.Tensor
    train: tuple  # (codes, letters) of the training words
    test: tuple  # (normalised inputs, codes, letters) of the test words
    W_dec: torch.Tensor
    test_words: list

    def letter(self, i: int) -> tuple[dict, list[dict]]:
        """Letter i's row (probe F1, k-sparse F1s, split latents, absorption) and its scored
        words."""
        cfg, (z_train, y_train), (xs_test, z_test, y_test) = self.cfg, self.train, self.test
        is_letter = y_test == i
        probe_f1 = f1(is_letter, self.probe_scores[:, i])
        f1s, chosen = k_sparse_f1s(
            z_train, y_train == i, z_test, is_letter, self.W_l1[i], cfg.max_k_value
        )
        main = split_latents(f1s, chosen, cfg.f1_jump_threshold)
        probe_D = torch.nn.functional.normalize(self.W_probe[i], dim=0)
        cos_F = self.W_dec @ probe_D
        found = np.nonzero(is_letter & (self.probe_scores[:, i] > 0))[0]
        scored = []
        for r in found:
            l0 = int((z_test[r] != 0).sum())  # latents the word's token takes
            scored.append(
                {"letter": LETTERS[i], "word": self.test_words[r], "l0": l0}
                | word_absorption(xs_test[r], z_test[r], probe_D, cos_F, main)
            )
        fractions = [w["absorption_fraction"] for w in scored]
        fulls = sum(w["is_full_absorption"] for w in scored)
        row = {
            "first_letter": LETTERS[i],
            "mean_absorption_fraction": float(np.mean(fractions)) if fractions else 0.0,
            "full_absorption_rate": fulls / len(found) if len(found) else 0.0,
            "num_full_absorption": int(fulls),
            "num_probe_true_positives": int(len(found)),
            "num_split_features": len(main),
            "probe_f1": probe_f1,
            "k_sparse_f1": f1s,
            "main_latents": main,
        }
        return row, scored


_DETAIL_KEYS = (
    "first_letter",
    "mean_absorption_fraction",
    "full_absorption_rate",
    "num_full_absorption",
    "num_probe_true_positives",
    "num_split_features",
)


def _mean_metrics(kept: pd.DataFrame) -> dict:
    """Means and standard deviations over the letters kept (SAEBench's `mean` block)."""

    def mean_sd(column: str) -> tuple[float, float]:
        values = kept[column].astype(float).tolist()
        if not values:
            return float("nan"), float("nan")
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    frac, frac_sd = mean_sd("mean_absorption_fraction")
    full, full_sd = mean_sd("full_absorption_rate")
    split, split_sd = mean_sd("num_split_features")
    return {
        "mean_absorption_fraction_score": frac,
        "mean_full_absorption_score": full,
        "mean_num_split_features": split,
        "std_dev_absorption_fraction_score": frac_sd,
        "std_dev_full_absorption_score": full_sd,
        "std_dev_num_split_features": split_sd,
    }
