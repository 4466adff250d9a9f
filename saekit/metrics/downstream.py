"""Downstream metrics: the SAE spliced into the model at its hook (nnsight patching): next-token CE
with the clean activations, with the SAE's reconstruction, zero- and mean-ablated, and KL(clean
|| spliced)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..sae import SAE
from .intervals import CE_STATS, STATISTICS, bootstrap_intervals, resample_weights

# default scored positions for the CE metrics (intervals narrow enough to compare SAEs)
CE_TOKENS = 16_384


def patched_logits(model, ids: torch.Tensor, hook, fn=None) -> torch.Tensor:
    """Logits [b, T, vocab] of a forward where the hook's value v is replaced by fn(v) (None:
    clean)."""
    from ..models import envoy

    with torch.no_grad():
        with model.trace({"input_ids": ids}):
            if fn is not None:
                env = envoy(model, hook)
                if hook.io == "input":
                    env.input = fn(env.input)
                else:
                    out = env.output
                    if isinstance(out, tuple):
                        env.output = (fn(out[0]), *out[1:])
                    else:
                        env.output = fn(out)
            logits = model.output.logits.save()
    return logits.float()


def _token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position but the last: [b, T-1]."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
    )


def _kl(logp_clean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || patched) of each next-token prediction but the last: [b, T-1]."""
    return (logp_clean.exp() * (logp_clean - logits.log_softmax(-1))).sum(-1)[:, :-1]


@torch.no_grad()
def ce_metrics(
    sae: SAE,
    model,
    tokens,
    keep,
    hook: str | None = None,
    mode: str | None = None,
    seq_batch: int = 8,
    mean_activation: torch.Tensor | None = None,
    progress: bool = False,
) -> dict:
    """CE loss clean / with the SAE spliced in / zero- and mean-ablated, CE recovered, KL.

    tokens [n_seq, T] ids, keep [n_seq, T] bool: positions the SAE replaces (BOS and padding stay
    clean) and whose next-token predictions count. Also the `x_hat + error` splice (== clean).
    Point values and 95% bootstrap intervals over sequences ("intervals").
    """
    return ce_metrics_many(
        [sae],
        model,
        tokens,
        keep,
        hook=hook,
        mode=mode,
        seq_batch=seq_batch,
        mean_activation=mean_activation,
        progress=progress,
    )[0]


@torch.no_grad()
def ce_metrics_many(
    saes: Sequence[SAE],
    model,
    tokens,
    keep,
    hook: str | None = None,
    mode: str | None = None,
    seq_batch: int = 8,
    mean_activation: torch.Tensor | None = None,
    progress: bool = False,
    error_splice: bool | Sequence[bool] = True,
    seq_index: Sequence[int] | None = None,
) -> list[dict]:
    """ce_metrics for several SAEs at one hook: the clean, zero- and mean-ablated forwards (and the
    mean activation) are computed once and shared; each SAE adds its own spliced forward (and the
    `x_hat + error` check where error_splice, one flag or one per SAE, says so). Every result
    carries 95% bootstrap intervals over sequences and its per-sequence sums ("_per_sequence");
    seq_index names the sequences (default 0..n-1) so two evaluations can be paired."""
    from ..models import resolve_hook, underlying

    splice_err = (
        [error_splice] * len(saes) if isinstance(error_splice, bool) else list(error_splice)
    )
    hp = resolve_hook(model, hook or saes[0].cfg.hook_name)
    device = next(underlying(model).parameters()).device
    tokens = torch.from_numpy(np.array(tokens, dtype=np.int64))
    keep = torch.from_numpy(np.array(keep, dtype=bool))
    if mean_activation is None:
        mean_activation = _mean_activation(model, tokens, keep, hp, device, seq_batch)
    was_training = [s.training for s in saes]
    for s in saes:
        s.eval()
    try:
        sums = CESums(tokens.shape[0], len(saes))
        for b in tqdm(range(0, tokens.shape[0], seq_batch), desc="CE", disable=not progress):
            batch = (tokens[b : b + seq_batch].to(device), keep[b : b + seq_batch])
            sums.add(b, model, hp, batch, mean_activation, saes, mode, splice_err)
    finally:
        for s, t in zip(saes, was_training):
            s.train(t)
    return [sums.result(i, with_err, seq_index) for i, with_err in enumerate(splice_err)]


def _mean_activation(model, tokens, keep, hp, device, seq_batch: int) -> torch.Tensor:
    """The hook's mean over the kept positions of these sequences (mean ablation's value)."""
    from ..activations import forward_hooks

    total, count = None, 0
    for b in range(0, tokens.shape[0], seq_batch):
        v = forward_hooks(model, tokens[b : b + seq_batch].to(device), [hp])[0]
        kb = keep[b : b + seq_batch].to(v.device)
        s = v[kb].double().sum(0)
        total = s if total is None else total + s
        count += int(kb.sum())
    return (total / max(count, 1)).float()


def _splice(recon_fn, keep_b: torch.Tensor, dev):
    """The hook's value with the kept positions replaced by recon_fn of them (computed on dev)."""

    def fn(v):
        kb = keep_b.to(v.device)
        new = torch.zeros_like(v)
        new[kb] = recon_fn(v[kb].to(dev).float()).to(v.dtype).to(v.device)
        return torch.where(kb[..., None], new, v)

    return fn


def _plus_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The reconstruction plus its error, x up to rounding."""
    return x_hat + (x - x_hat)


def _per_row(v: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    return (v * target).sum(1).double().cpu().numpy()


class CESums:
    """Per-sequence sums of next-token CE and KL: the clean, zero- and mean-ablated forwards shared
    by every SAE, and each SAE's own spliced forwards."""

    def __init__(self, n_seq: int, n_saes: int):
        self.shared = {k: np.zeros(n_seq) for k in ("clean", "zero", "mean", "n", "kl_zero")}
        names = ("sae", "sae_plus_error", "kl_sae", "kl_sae_plus_error")
        self.own = [{k: np.zeros(n_seq) for k in names} for _ in range(n_saes)]

    def add(self, b: int, model, hp, batch, mean_activation, saes, mode, splice_err) -> None:
        """The sums of the sequences from b on: batch = (ids on the model's device, keep)."""
        ids, keep_b = batch
        rows = slice(b, b + ids.shape[0])
        target = keep_b[:, 1:].to(ids.device)
        clean = patched_logits(model, ids, hp)
        logp_clean = clean.log_softmax(-1)
        shared = self.shared
        shared["clean"][rows] += _per_row(_token_ce(clean, ids), target)
        shared["n"][rows] += target.sum(1).cpu().numpy()
        for name, fn in (
            ("zero", lambda x: torch.zeros_like(x)),
            ("mean", lambda x: mean_activation.to(x.device).expand_as(x)),
        ):
            logits = patched_logits(model, ids, hp, _splice(fn, keep_b, ids.device))
            shared[name][rows] += _per_row(_token_ce(logits, ids), target)
            if name == "zero":
                shared["kl_zero"][rows] += _per_row(_kl(logp_clean, logits), target)
        for sae, sums, with_err in zip(saes, self.own, splice_err):
            dev = next(sae.parameters()).device
            runs = {"sae": lambda x, sae=sae: sae(x, mode=mode).x_hat}
            if with_err:  # the splice machinery itself must give the clean CE back
                runs["sae_plus_error"] = lambda x, sae=sae: _plus_error(x, sae(x, mode=mode).x_hat)
            for name, fn in runs.items():
                logits = patched_logits(model, ids, hp, _splice(fn, keep_b, dev))
                sums[name][rows] += _per_row(_token_ce(logits, ids), target)
                sums[f"kl_{name}"][rows] += _per_row(_kl(logp_clean, logits), target)

    def result(self, i: int, with_err: bool, seq_index=None) -> dict:
        """SAE i's figures: means per scored token, CE recovered and the rest, their intervals."""
        shared, sums = self.shared, self.own[i]
        n = int(shared["n"].sum())
        if n == 0:
            raise ValueError("no positions to score: the sequences hold no kept next-token targets")
        used = shared["n"] > 0
        seq_ids = np.arange(len(used)) if seq_index is None else np.asarray(seq_index)
        weights = resample_weights(int(used.sum())) if used.sum() >= 2 else None
        per_seq = {
            "seq": seq_ids[used].tolist(),
            **{k: shared[k][used].tolist() for k in ("clean", "zero", "mean", "n")},
            "sae": sums["sae"][used].tolist(),
            "kl": sums["kl_sae"][used].tolist(),
        }
        tot = {k: float(np.sum(v)) for k, v in per_seq.items() if k != "seq"}
        ce = {k: tot[k] / n for k in ("clean", "zero", "mean", "sae")}
        with np.errstate(divide="ignore", invalid="ignore"):
            point = {name: float(STATISTICS[name](tot)) for name in CE_STATS}
        with_error = lambda key: float(sums[key].sum()) / n if with_err else None
        return {
            "n_tokens": n,
            "n_sequences": int(used.sum()),
            "ce_clean": ce["clean"],
            "ce_sae": ce["sae"],
            "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"],
            "kl_zero_ablation": float(shared["kl_zero"].sum()) / n,
            **point,
            "ce_sae_plus_error": with_error("sae_plus_error"),
            "kl_sae_plus_error": with_error("kl_sae_plus_error"),
            "intervals": bootstrap_intervals(per_seq, CE_STATS, weights=weights)
            if weights is not None
            else None,
            "_per_sequence": per_seq,
        }


def sample_sequences(
    keep: np.ndarray, n_positions: int, seed: int = 0, targets: bool = False
) -> np.ndarray:
    """Sorted indices of sequences drawn in a seeded random order until they hold n_positions kept
    positions (targets=True: kept next-token targets, i.e. positions 1..T-1), so a subset samples
    every part of the data rather than its first sequences. All sequences when they hold fewer."""
    keep = np.asarray(keep, dtype=bool)
    counts = (keep[:, 1:] if targets else keep).sum(1)
    order = np.random.default_rng(seed).permutation(keep.shape[0])
    order = order[counts[order] > 0]
    m = int(np.searchsorted(np.cumsum(counts[order]), n_positions)) + 1
    return np.sort(order[:m])
