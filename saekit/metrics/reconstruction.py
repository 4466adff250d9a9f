"""Reconstruction and sparsity of an SAE on activations: NMSE, FVU, cosine, the paper's normalised
MSE, L0 and its distribution, dead and dense latents, accumulated per sequence for the intervals."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..sae import SAE
from .intervals import RECON_STATS, STATISTICS, bootstrap_intervals

DENSE_FRACTION = 0.10  # a latent firing on more than 10% of tokens is "dense"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def nmse_tensor(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """sum ||x - x_hat||^2 / sum ||x||^2 as a 0-dim tensor on x's device (the one definition:
    STATISTICS["nmse"] of the two sums); the trainer reads it back only when a step's statistics
    are asked for."""
    return STATISTICS["nmse"](
        {"err": (x - x_hat).pow(2).sum(), "norm": x.pow(2).sum().clamp_min(1e-30)}
    )


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """nmse_tensor as a float."""
    return float(nmse_tensor(x, x_hat))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (1 - explained variance)"""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean per-token cosine similarity of x and x_hat."""
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


class _Accumulator:
    """Streams batches and keeps the sums the metrics need (per row, to sum per sequence)."""

    def __init__(self, d_sae: int):
        self.cos = 0.0
        self.sum_x = None
        self.sum_x2 = 0.0
        self.n = 0
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.rows: dict[str, list[torch.Tensor]] = {
            "err": [],
            "norm": [],
            "err_normalized": [],
            "l0": [],
            "seq": [],
        }

    def add(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        z: torch.Tensor,
        err_normalized: torch.Tensor,
        seq: torch.Tensor | None = None,
    ) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.rows["err"].append((x - x_hat).pow(2).sum(-1).cpu())
        self.rows["norm"].append(x.pow(2).sum(-1).cpu())
        self.rows["err_normalized"].append(err_normalized.double().cpu())
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_x2 += float(x.pow(2).sum())
        self.n += x.shape[0]
        active = z != 0
        self.fires += active.sum(0).cpu()
        self.rows["l0"].append(active.sum(-1).cpu())
        if seq is not None:
            self.rows["seq"].append(torch.as_tensor(seq).long().cpu())

    def per_sequence(self) -> dict | None:
        """Per-sequence sums {seq, err, norm, err_normalized, l0, n} (None without sequence ids)."""
        if len(self.rows["seq"]) != len(self.rows["err"]):
            return None
        seq = torch.cat(self.rows["seq"]).numpy()
        ids, inv = np.unique(seq, return_inverse=True)
        out = {"seq": ids.tolist()}
        for k in ("err", "norm", "err_normalized", "l0"):
            out[k] = np.bincount(
                inv, weights=torch.cat(self.rows[k]).double().numpy(), minlength=ids.size
            ).tolist()
        out["n"] = np.bincount(inv, minlength=ids.size).astype(float).tolist()
        return out

    def result(self) -> dict:
        err = float(torch.cat(self.rows["err"]).sum())
        norm = float(torch.cat(self.rows["norm"]).sum())
        var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n  # sum ||x - mean||^2
        per_token = torch.cat(self.rows["l0"]).float()
        density = self.fires.double() / self.n
        q = torch.quantile(per_token, torch.tensor(QUANTILES)).tolist()
        out = {
            "n_tokens": self.n,
            "nmse": STATISTICS["nmse"]({"err": err, "norm": max(norm, 1e-30)}),
            "mse_normalized": float(torch.cat(self.rows["err_normalized"]).sum()) / self.n,
            "fvu": err / max(var, 1e-30),
            "explained_variance": 1 - err / max(var, 1e-30),
            "cosine": self.cos / self.n,
            "l0": float(per_token.mean()),
            "l0_std": float(per_token.std()) if per_token.numel() > 1 else 0.0,
            "l0_quantiles": {str(k): v for k, v in zip(QUANTILES, q)},
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((density > DENSE_FRACTION).double().mean()),
            "_per_token_l0": per_token,
            "_density": density,
        }
        per_seq = self.per_sequence()
        if per_seq is not None and len(per_seq["seq"]) >= 2:
            out["_per_sequence"] = per_seq
            out["intervals"] = bootstrap_intervals(per_seq, RECON_STATS)
        return out


@torch.no_grad()
def per_token_l0(
    sae: SAE,
    store,
    n_tokens: int | None = None,
    mode: str | None = None,
    batch_size: int = 4096,
    hook: str | None = None,
    allow_mismatch: bool = False,
) -> np.ndarray:
    """Active-latent count of each of a store's first n_tokens (inference mode unless `mode`), at
    the SAE's hook (saekit.plumbing.checks)."""
    from ..plumbing.checks import hook_on_store

    n = len(store) if n_tokens is None else min(n_tokens, len(store))
    batches = store.head_batches(n, batch_size, hook_on_store(sae, store, hook, allow_mismatch))
    return reconstruction_metrics(sae, batches, mode=mode)["_per_token_l0"].numpy()


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, batches: Iterable, mode: str | None = None, device: str | torch.device | None = None
) -> dict:
    """NMSE, FVU, cosine, mse_normalized, L0 (mean, std, quantiles), dead and dense fractions over
    batches.

    batches: tensors x [B, d], or (x, seq) pairs with the sequence id of every row, which adds
    95% bootstrap intervals over sequences ("intervals") and the per-sequence sums
    ("_per_sequence"). BatchTopK uses threshold mode unless mode="batch", so results do not depend
    on batch size. Keys starting with "_" hold tensors: per-token L0 and per-latent firing density.
    """
    return reconstruction_metrics_many([(sae, mode)], batches, device)[0]


@torch.no_grad()
def reconstruction_metrics_many(
    runs: Sequence[tuple[SAE, str | None]],
    batches: Iterable,
    device: str | torch.device | None = None,
) -> list[dict]:
    """reconstruction_metrics of several (SAE, mode) pairs over one pass of the batches: each batch
    is read (or computed by the model) once for all of them, e.g. an SAE in threshold and in
    batch mode and its prefixes."""
    device = device or next(runs[0][0].parameters()).device
    saes = list(dict.fromkeys(sae for sae, _ in runs))  # each SAE once, in order
    was_training = [sae.training for sae in saes]
    accs = [_Accumulator(sae.cfg.d_sae) for sae, _ in runs]
    for sae in saes:
        sae.eval()
    try:
        for item in batches:
            x, seq = item if isinstance(item, (tuple, list)) else (item, None)
            x = x.to(device).float()
            for (sae, mode), acc in zip(runs, accs):
                xs, ctx = sae.normalize_input(x)
                z, x_hat = sae(x, mode=mode)
                acc.add(x, x_hat, z, (xs - sae.renormalize(x_hat, ctx)).pow(2).mean(-1), seq)
    finally:
        for sae, training in zip(saes, was_training):
            sae.train(training)
    if accs[0].n == 0:
        raise ValueError("no activations to evaluate")
    return [acc.result() for acc in accs]


def l0_histogram(per_token_l0: torch.Tensor, max_bins: int = 200) -> dict:
    """Histogram data of per-token latent counts: {"count": [...], "tokens": [...]}."""
    v = per_token_l0.long().numpy()
    top = int(min(v.max(initial=0), max_bins))
    counts = np.bincount(np.clip(v, 0, top), minlength=top + 1)
    return {"count": list(range(top + 1)), "tokens": counts.tolist()}


def public(metrics: dict) -> dict:
    """The JSON-safe part of a metrics dict (drops tensor-valued and per-sequence keys)."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}
