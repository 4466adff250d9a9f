"""Reconstruction and sparsity metrics, defined once and used everywhere, with 95% bootstrap intervals.

Definitions (README, "Metrics"): NMSE = sum ||x - x_hat||^2 / sum ||x||^2; FVU = sum ||x - x_hat||^2 /
sum ||x - mean x||^2; mse_normalized = mean squared error per element in the SAE's normalised input
space (what the BatchTopK paper's code logs as its l2 loss); L0 = active latents per token; CE recovered
= (CE_ablated - CE_sae) / (CE_ablated - CE_clean); KL(clean || spliced) per next-token prediction.
Intervals resample whole sequences (tokens of one sequence are not independent).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .sae import SAE

DENSE_FRACTION = 0.10  # a latent firing on more than 10% of tokens is "dense"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
N_BOOT = 1000  # bootstrap resamples for every interval
LEVEL = 0.95


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x||^2"""
    return float((x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (1 - explained variance)"""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean per-token cosine similarity of x and x_hat."""
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


# ---------------------------------------------------------------------------------------------
# intervals: every statistic is a function of per-sequence sums, resampled over sequences

# statistic -> function of summed per-sequence quantities (numbers or arrays of bootstrap sums)
STATISTICS: dict[str, Callable[[dict], np.ndarray]] = {
    "nmse": lambda s: s["err"] / s["norm"],
    "mse_normalized": lambda s: s["err_normalized"] / s["n"],
    "l0": lambda s: s["l0"] / s["n"],
    "ce_recovered": lambda s: (s["zero"] - s["sae"]) / (s["zero"] - s["clean"]),
    "ce_recovered_mean": lambda s: (s["mean"] - s["sae"]) / (s["mean"] - s["clean"]),
    "ce_delta": lambda s: (s["sae"] - s["clean"]) / s["n"],
    "kl": lambda s: s["kl"] / s["n"],
}
RECON_STATS = ("nmse", "mse_normalized", "l0")
CE_STATS = ("ce_recovered", "ce_recovered_mean", "ce_delta", "kl")


def resample_weights(n_seq: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n_seq] how often each sequence is drawn in each bootstrap resample."""
    if n_seq < 2:
        raise ValueError(f"an interval needs at least 2 sequences, got {n_seq}")
    return np.random.default_rng(seed).multinomial(n_seq, np.full(n_seq, 1.0 / n_seq), size=n_boot).astype(np.float64)


def _interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    a = (1 - level) / 2
    lo, hi = np.nanquantile(values, [a, 1 - a])
    return [float(lo), float(hi)]


def bootstrap_intervals(per_seq: dict, stats: Sequence[str], n_boot: int = N_BOOT, seed: int = 0,
                        weights: np.ndarray | None = None) -> dict[str, list[float]]:
    """95% percentile intervals of `stats` (names in STATISTICS) from per-sequence sums {name: [n_seq]}."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in per_seq.items() if k != "seq"}
    n_seq = len(next(iter(arrays.values())))
    w = resample_weights(n_seq, n_boot, seed) if weights is None else weights
    boot = {k: w @ v for k, v in arrays.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {name: _interval(STATISTICS[name](boot)) for name in stats}


def paired_difference(a: dict, b: dict, metric: str, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """metric(a) - metric(b) with a 95% bootstrap interval, resampling the same sequences for both.

    a, b: evaluate() results on the same evaluation data (their "per_sequence" sections); only the
    sequences both scored are used. Returns {"metric", "a", "b", "difference", "interval", "n_sequences",
    "excludes_zero"}."""
    part = "ce" if metric in CE_STATS else "recon"
    pa, pb = (m.get("per_sequence", {}).get(part) for m in (a, b))
    if not pa or not pb:
        raise ValueError(f"both evaluations need per-sequence {part} sums (evaluate() with sequences; for CE a model)")
    common = np.intersect1d(pa["seq"], pb["seq"])
    if common.size < 2:
        raise ValueError("the two evaluations share fewer than 2 sequences: evaluate both on the same data")

    def pick(p):
        idx = np.searchsorted(np.asarray(p["seq"]), common)
        return {k: np.asarray(v, dtype=np.float64)[idx] for k, v in p.items() if k != "seq"}

    sa, sb = pick(pa), pick(pb)
    w = resample_weights(common.size, n_boot, seed)
    f = STATISTICS[metric]
    with np.errstate(divide="ignore", invalid="ignore"):
        va, vb = float(f({k: v.sum() for k, v in sa.items()})), float(f({k: v.sum() for k, v in sb.items()}))
        diffs = f({k: w @ v for k, v in sa.items()}) - f({k: w @ v for k, v in sb.items()})
    lo, hi = _interval(diffs)
    return {"metric": metric, "a": va, "b": vb, "difference": va - vb, "interval": [lo, hi],
            "n_sequences": int(common.size), "excludes_zero": bool(lo > 0 or hi < 0)}


def format_difference(d: dict, name_a: str = "a", name_b: str = "b", digits: int = 4) -> str:
    """'BatchTopK − TopK: +0.0027 [−0.0010, +0.0061]' (and whether the interval excludes zero)."""
    f = lambda v: f"{v:+.{digits}f}".replace("-", "−")
    verdict = "differs" if d["excludes_zero"] else "within noise"
    return (f"{d['metric']} {name_a} − {name_b}: {f(d['difference'])} [{f(d['interval'][0])}, "
            f"{f(d['interval'][1])}] ({verdict}; {d['n_sequences']} sequences)")


# ---------------------------------------------------------------------------------------------
# reconstruction and sparsity


class _Accumulator:
    """Streams batches and keeps the sums the metrics need (per row, to sum per sequence)."""

    def __init__(self, d_sae: int):
        self.cos = 0.0
        self.sum_x = None
        self.sum_x2 = 0.0
        self.n = 0
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.rows: dict[str, list[torch.Tensor]] = {"err": [], "norm": [], "err_normalized": [], "l0": [], "seq": []}

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, err_normalized: torch.Tensor,
            seq: torch.Tensor | None = None) -> None:
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
            out[k] = np.bincount(inv, weights=torch.cat(self.rows[k]).double().numpy(), minlength=ids.size).tolist()
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
def per_token_l0(sae: SAE, store, n_tokens: int | None = None, mode: str | None = None,
                 batch_size: int = 4096) -> np.ndarray:
    """Active-latent count of each of a store's first n_tokens (inference mode unless `mode`)."""
    n = len(store) if n_tokens is None else min(n_tokens, len(store))
    hook = sae.cfg.hook_name if sae.cfg.hook_name in store.hooks else None
    batches = (store.rows(s, min(s + batch_size, n), hook).float() for s in range(0, n, batch_size))
    return reconstruction_metrics(sae, batches, mode=mode)["_per_token_l0"].numpy()


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable, mode: str | None = None,
                           device: str | torch.device | None = None) -> dict:
    """NMSE, FVU, cosine, mse_normalized, L0 (mean, std, quantiles), dead and dense fractions over batches.

    batches: tensors x [B, d], or (x, seq) pairs with the sequence id of every row, which adds
    95% bootstrap intervals over sequences ("intervals") and the per-sequence sums ("_per_sequence").
    BatchTopK uses threshold mode unless mode="batch", so results do not depend on batch size.
    Keys starting with "_" hold tensors: per-token L0 and per-latent firing density.
    """
    device = device or next(sae.parameters()).device
    was_training = sae.training
    sae.eval()
    acc = _Accumulator(sae.cfg.d_sae)
    try:
        for item in batches:
            x, seq = item if isinstance(item, (tuple, list)) else (item, None)
            x = x.to(device).float()
            xs, ctx = sae.normalize_input(x)
            z, x_hat = sae(x, mode=mode)
            acc.add(x, x_hat, z, (xs - sae.renormalize(x_hat, ctx)).pow(2).mean(-1), seq)
    finally:
        sae.train(was_training)
    if acc.n == 0:
        raise ValueError("no activations to evaluate")
    return acc.result()


def l0_histogram(per_token_l0: torch.Tensor, max_bins: int = 200) -> dict:
    """Histogram data of per-token latent counts: {"count": [...], "tokens": [...]}."""
    v = per_token_l0.long().numpy()
    top = int(min(v.max(initial=0), max_bins))
    counts = np.bincount(np.clip(v, 0, top), minlength=top + 1)
    return {"count": list(range(top + 1)), "tokens": counts.tolist()}


def public(metrics: dict) -> dict:
    """The JSON-safe part of a metrics dict (drops tensor-valued and per-sequence keys)."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# downstream: the SAE spliced into the model at its hook (nnsight patching)

SCHEMA = "saekit.eval/2"


def _patched_logits(model, ids: torch.Tensor, hook, fn=None) -> torch.Tensor:
    """Logits [b, T, vocab] of a forward where the hook's value v is replaced by fn(v) (None: clean)."""
    from .models import envoy

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
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def ce_metrics(sae: SAE, model, tokens, keep, hook: str | None = None, mode: str | None = None,
               seq_batch: int = 8, mean_activation: torch.Tensor | None = None, progress: bool = False) -> dict:
    """CE loss clean / with the SAE spliced in / zero- and mean-ablated, CE recovered, KL.

    tokens [n_seq, T] ids, keep [n_seq, T] bool: positions the SAE replaces (BOS and padding stay
    clean) and whose next-token predictions count. Also the `x_hat + error` splice (== clean).
    Point values and 95% bootstrap intervals over sequences ("intervals").
    """
    return ce_metrics_many([sae], model, tokens, keep, hook=hook, mode=mode, seq_batch=seq_batch,
                           mean_activation=mean_activation, progress=progress)[0]


@torch.no_grad()
def ce_metrics_many(saes: Sequence[SAE], model, tokens, keep, hook: str | None = None, mode: str | None = None,
                    seq_batch: int = 8, mean_activation: torch.Tensor | None = None, progress: bool = False,
                    error_splice: bool | Sequence[bool] = True, seq_index: Sequence[int] | None = None) -> list[dict]:
    """ce_metrics for several SAEs at one hook: the clean, zero- and mean-ablated forwards (and the mean
    activation) are computed once and shared; each SAE adds its own spliced forward (and the
    `x_hat + error` check where error_splice, one flag or one per SAE, says so). Every result carries
    95% bootstrap intervals over sequences and its per-sequence sums ("_per_sequence"); seq_index names
    the sequences (default 0..n-1) so two evaluations can be paired."""
    splice_err = [error_splice] * len(saes) if isinstance(error_splice, bool) else list(error_splice)
    from tqdm.auto import tqdm

    from .models import resolve_hook, underlying

    hp = resolve_hook(model, hook or saes[0].cfg.hook_name)
    device = next(underlying(model).parameters()).device
    tokens = torch.from_numpy(np.array(tokens, dtype=np.int64))
    keep = torch.from_numpy(np.array(keep, dtype=bool))
    was_training = [s.training for s in saes]
    for s in saes:
        s.eval()

    def splice(recon_fn, dev):
        def fn(v):
            kb = keep_b.to(v.device)
            new = torch.zeros_like(v)
            new[kb] = recon_fn(v[kb].to(dev).float()).to(v.dtype).to(v.device)
            return torch.where(kb[..., None], new, v)
        return fn

    if mean_activation is None:  # dataset mean of the hook over these positions (for mean ablation)
        from .activations import forward_hooks

        total, count = None, 0
        for b in range(0, tokens.shape[0], seq_batch):
            v = forward_hooks(model, tokens[b:b + seq_batch].to(device), [hp])[0]
            kb = keep[b:b + seq_batch].to(v.device)
            s = v[kb].double().sum(0)
            total = s if total is None else total + s
            count += int(kb.sum())
        mean_activation = (total / max(count, 1)).float()
    n_seq = tokens.shape[0]
    shared = {k: np.zeros(n_seq) for k in ("clean", "zero", "mean", "n")}  # per-sequence sums
    own = [{k: np.zeros(n_seq) for k in ("sae", "sae_plus_error", "kl_sae", "kl_sae_plus_error")} for _ in saes]
    bar = tqdm(range(0, n_seq, seq_batch), desc="CE", disable=not progress)

    def per_row(v: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        return (v * target).sum(1).double().cpu().numpy()

    try:
        for b in bar:
            ids = tokens[b:b + seq_batch].to(device)
            keep_b = keep[b:b + seq_batch]
            rows = slice(b, b + ids.shape[0])
            target = keep_b[:, 1:].to(device)
            clean = _patched_logits(model, ids, hp)
            logp_clean = clean.log_softmax(-1)
            shared["clean"][rows] += per_row(_token_ce(clean, ids), target)
            shared["n"][rows] += target.sum(1).cpu().numpy()
            for name, fn in (("zero", lambda x: torch.zeros_like(x)),
                             ("mean", lambda x: mean_activation.to(x.device).expand_as(x))):
                shared[name][rows] += per_row(_token_ce(_patched_logits(model, ids, hp, splice(fn, device)), ids), target)
            for sae, sums, with_err in zip(saes, own, splice_err):
                dev = next(sae.parameters()).device
                runs = {"sae": lambda x, sae=sae: sae(x, mode=mode).x_hat}
                if with_err:
                    runs["sae_plus_error"] = lambda x, sae=sae: (lambda x_hat: x_hat + (x - x_hat))(sae(x, mode=mode).x_hat)
                for name, fn in runs.items():
                    logits = _patched_logits(model, ids, hp, splice(fn, dev))
                    sums[name][rows] += per_row(_token_ce(logits, ids), target)
                    kl = (logp_clean.exp() * (logp_clean - logits.log_softmax(-1))).sum(-1)[:, :-1]
                    sums[f"kl_{name}"][rows] += per_row(kl, target)
    finally:
        for s, t in zip(saes, was_training):
            s.train(t)
    n = int(shared["n"].sum())
    if n == 0:
        raise ValueError("no positions to score: the sequences hold no kept next-token targets")
    used = shared["n"] > 0
    seq_ids = np.arange(n_seq) if seq_index is None else np.asarray(seq_index)
    weights = resample_weights(int(used.sum())) if used.sum() >= 2 else None
    results = []
    for sums, with_err in zip(own, splice_err):
        per_seq = {"seq": seq_ids[used].tolist(), **{k: shared[k][used].tolist() for k in ("clean", "zero", "mean", "n")},
                   "sae": sums["sae"][used].tolist(), "kl": sums["kl_sae"][used].tolist()}
        tot = {k: float(np.sum(v)) for k, v in per_seq.items() if k != "seq"}
        ce = {k: tot[k] / n for k in ("clean", "zero", "mean", "sae")}
        with np.errstate(divide="ignore", invalid="ignore"):
            point = {name: float(STATISTICS[name](tot)) for name in CE_STATS}
        results.append({
            "n_tokens": n, "n_sequences": int(used.sum()), "ce_clean": ce["clean"], "ce_sae": ce["sae"],
            "ce_zero_ablation": ce["zero"], "ce_mean_ablation": ce["mean"], **point,
            "ce_sae_plus_error": float(sums["sae_plus_error"].sum()) / n if with_err else None,
            "kl_sae_plus_error": float(sums["kl_sae_plus_error"].sum()) / n if with_err else None,
            "intervals": bootstrap_intervals(per_seq, CE_STATS, weights=weights) if weights is not None else None,
            "_per_sequence": per_seq,
        })
    return results


def sample_sequences(keep: np.ndarray, n_positions: int, seed: int = 0, targets: bool = False) -> np.ndarray:
    """Sorted indices of sequences drawn in a seeded random order until they hold n_positions kept
    positions (targets=True: kept next-token targets, i.e. positions 1..T-1), so a subset samples every
    part of the data rather than its first sequences. All sequences when they hold fewer."""
    keep = np.asarray(keep, dtype=bool)
    counts = (keep[:, 1:] if targets else keep).sum(1)
    order = np.random.default_rng(seed).permutation(keep.shape[0])
    order = order[counts[order] > 0]
    m = int(np.searchsorted(np.cumsum(counts[order]), n_positions)) + 1
    return np.sort(order[:m])


CE_TOKENS = 16_384  # default scored positions for the CE metrics (intervals narrow enough to compare SAEs)


def evaluate(sae: SAE, model=None, data=None, n_tokens: int = 20_000, ce_tokens: int = CE_TOKENS,
             mode: str | None = None, batch_size: int = 4096, seq_batch: int = 8, hook: str | None = None,
             progress: bool = False, seed: int = 0) -> dict:
    """All metrics of one SAE, in a stable JSON-able dict (schema "saekit.eval/2", see README).

    data: an ActivationStore (or its folder) or PackedTokens. Reconstruction and sparsity use up to
    n_tokens activations, the downstream CE metrics (needs `model`) ce_tokens scored positions; both
    from sequences drawn at random (seeded) from the whole data, not its first ones. NMSE, L0, CE
    recovered and KL carry 95% bootstrap intervals over sequences ("intervals"); "per_sequence" keeps
    the sums behind them so paired_difference() can compare two SAEs. BatchTopK uses threshold mode
    unless mode="batch"; its batch-mode L0 and the ratio of the two are reported too.
    """
    return evaluate_many([sae], model, data, n_tokens, ce_tokens, mode, batch_size, seq_batch, hook, progress, seed)[0]


def evaluate_many(saes: Sequence[SAE], model=None, data=None, n_tokens: int = 20_000, ce_tokens: int = CE_TOKENS,
                  mode: str | None = None, batch_size: int = 4096, seq_batch: int = 8, hook: str | None = None,
                  progress: bool = False, seed: int = 0, error_splice: bool = True) -> list[dict]:
    """evaluate() for several SAEs at one hook on the same sequences: the clean, zero- and mean-ablated
    forwards are made once for all of them (ce_metrics_many), so their results pair up exactly.
    error_splice=False skips the `x_hat + error` check (one forward per SAE)."""
    from pathlib import Path

    from .activations import ActivationStore, forward_hooks
    from .data import PackedTokens
    from .models import resolve_hook, underlying

    hook = hook or saes[0].cfg.hook_name
    if isinstance(data, (str, Path)):
        data = ActivationStore(data)
    if isinstance(data, ActivationStore):
        h = hook if hook in data.hooks else None  # the SAE's hook where the store has it
        tokens, pos = data.tokens, data.positions()
        keep = np.zeros(tokens.shape, dtype=bool)
        keep[pos[:, 0], pos[:, 1]] = True
        chosen = sample_sequences(keep, n_tokens, seed)
        rows = np.flatnonzero(np.isin(pos[:, 0], chosen))[:n_tokens]

        def make_batches():
            for s in range(0, rows.size, batch_size):
                r = rows[s:s + batch_size]
                yield data.take(r, h), torch.from_numpy(pos[r, 0].astype(np.int64))
    elif isinstance(data, PackedTokens):
        if model is None:
            raise ValueError("evaluating on a corpus needs the model to compute activations")
        hp = resolve_hook(model, hook)
        device = next(underlying(model).parameters()).device
        tokens, keep = data.tokens, data.keep
        chosen = sample_sequences(keep, n_tokens, seed)

        def make_batches():
            for b in range(0, chosen.size, seq_batch):
                idx = chosen[b:b + seq_batch]
                v = forward_hooks(model, torch.from_numpy(tokens[idx].astype(np.int64)).to(device), [hp])[0]
                kb = torch.from_numpy(keep[idx])
                seq = torch.from_numpy(idx.astype(np.int64))[:, None].expand(kb.shape)[kb]
                yield v[kb.to(v.device)], seq
    else:
        raise ValueError(f"evaluate() takes an ActivationStore, its folder or PackedTokens, not {type(data).__name__}")
    # Matryoshka: every nested prefix is evaluated as an SAE of its own; the CE baselines are shared by all
    subs = [[s.prefix(g) for g in range(1, len(s.cfg.group_sizes) + 1)] if hasattr(s, "prefix") else [] for s in saes]
    ce_all = None
    if model is not None:
        ce_seq = sample_sequences(keep, ce_tokens, seed, targets=True)
        flat = [x for sae, sb in zip(saes, subs) for x in (sae, *sb)]
        flags = [f for sb in subs for f in (error_splice, *([False] * len(sb)))]
        ce_all = iter(ce_metrics_many(flat, model, tokens[ce_seq], keep[ce_seq], hook=hook, mode=mode,
                                      seq_batch=seq_batch, progress=progress, error_splice=flags, seq_index=ce_seq))
    results = []
    for sae, sb in zip(saes, subs):
        downstream = next(ce_all) if ce_all is not None else None
        sub_ce = [next(ce_all) for _ in sb] if ce_all is not None else [{} for _ in sb]
        results.append(_one_evaluation(sae, sb, downstream, sub_ce, make_batches, mode, hook, len(chosen)))
    return results


def _one_evaluation(sae, subs, downstream, sub_ce, make_batches, mode, hook, n_sequences) -> dict:
    """evaluate()'s dict for one SAE, given its (and its prefixes') CE results."""
    rec = reconstruction_metrics(sae, make_batches(), mode=mode)
    c = sae.cfg
    sparsity = {"l0": rec["l0"], "l0_std": rec["l0_std"], "l0_quantiles": rec["l0_quantiles"],
                "l0_histogram": l0_histogram(rec["_per_token_l0"]), "dead_fraction": rec["dead_fraction"],
                "dense_fraction": rec["dense_fraction"]}
    if hasattr(sae, "threshold_for_l0") and mode in (None, "threshold"):
        # the batch-coupled training-time code next to the threshold that replaces it
        batch_l0 = reconstruction_metrics(sae, (x for x, _ in make_batches()), mode="batch")["l0"]
        sparsity.update({"l0_batch_mode": batch_l0, "l0_threshold_mode": rec["l0"],
                         "l0_threshold_over_batch": rec["l0"] / batch_l0 if batch_l0 else float("nan")})
    prefixes = None
    if subs:
        prefixes = []
        for g, (sub, d) in enumerate(zip(subs, sub_ce), start=1):
            r = reconstruction_metrics(sub, make_batches(), mode=mode)
            prefixes.append({"groups": g, "width": sub.cfg.d_sae,
                             **{k: r[k] for k in ("nmse", "mse_normalized", "fvu", "explained_variance", "cosine")},
                             "l0": r["l0"], "ce_recovered": d.get("ce_recovered"), "kl": d.get("kl"),
                             "intervals": {**r.get("intervals", {}), **(d.get("intervals") or {})}})
    downstream = dict(downstream) if downstream is not None else None
    per_sequence = {"recon": rec.get("_per_sequence")}
    if downstream is not None:
        per_sequence["ce"] = downstream.pop("_per_sequence")
    intervals = {**rec.get("intervals", {}), **((downstream or {}).get("intervals") or {})}
    out = {
        "schema": SCHEMA,
        "sae": {"architecture": c.arch, "d_in": c.d_in, "d_sae": c.d_sae,
                "k": c.k if c.arch in ("batchtopk", "topk", "matryoshka") else None, "target_l0": c.target_l0,
                "l1_coeff": c.l1_coeff if c.arch == "relu" else None,
                "hook_name": hook, "model_name": c.model_name,
                "theta": float(sae.threshold) if hasattr(sae, "threshold_for_l0") else None,
                "theta_info": sae.theta_info},
        "mode": mode or ("threshold" if c.arch in ("batchtopk", "matryoshka") else "default"),
        "n_tokens": rec["n_tokens"],
        "n_sequences": n_sequences,
        "reconstruction": {k: rec[k] for k in ("nmse", "mse_normalized", "fvu", "explained_variance", "cosine")},
        "sparsity": sparsity,
        "downstream": downstream,
        "intervals": intervals,
        "interval_method": {"level": LEVEL, "method": "percentile bootstrap over sequences", "n_boot": N_BOOT,
                            "seed": 0},
        "per_sequence": per_sequence,
    }
    if prefixes is not None:
        out["sae"]["group_sizes"] = list(c.group_sizes)
        out["prefixes"] = prefixes
    return out


def describe(m: dict) -> str:
    """evaluate()'s result as a few readable lines, each figure with its 95% interval."""
    def f(name, value, digits=4, iv=m.get("intervals") or {}):
        lo_hi = iv.get(name)
        return f"{value:.{digits}f}" + (f" [{lo_hi[0]:.{digits}f}, {lo_hi[1]:.{digits}f}]" if lo_hi else "")

    r, sp, d = m["reconstruction"], m["sparsity"], m["downstream"]
    s = m["sae"]
    lines = [f"{s['architecture']} SAE, {s['d_sae']:,} latents, {m['mode']} mode, on {m['n_tokens']:,} tokens "
             f"({m.get('n_sequences', '?')} sequences); 95% bootstrap intervals over sequences in brackets",
             f"  NMSE {f('nmse', r['nmse'])}  (paper's logged MSE, normalised space: "
             f"{f('mse_normalized', r['mse_normalized'])})  FVU {r['fvu']:.4f}  cosine {r['cosine']:.4f}",
             f"  L0 {f('l0', sp['l0'], 2)} (std {sp['l0_std']:.1f})  dead {sp['dead_fraction']:.3f}  "
             f"dense {sp['dense_fraction']:.3f}"]
    if "l0_batch_mode" in sp:
        target = s.get("k")
        lines.append(f"  L0 threshold mode {sp['l0_threshold_mode']:.2f} / batch mode {sp['l0_batch_mode']:.2f} = "
                     f"{sp['l0_threshold_over_batch']:.3f} (k = {target}; theta = {s['theta']:.4f}, "
                     f"{(s.get('theta_info') or {}).get('source', 'training')})")
    if d:
        lines.append(f"  CE clean {d['ce_clean']:.4f}  with SAE {d['ce_sae']:.4f}  zero-ablated {d['ce_zero_ablation']:.4f}"
                     f"  mean-ablated {d['ce_mean_ablation']:.4f}  (nats/token)")
        civ = d.get("intervals") or {}
        lines.append(f"  CE recovered {f('ce_recovered', d['ce_recovered'], iv=civ)} (vs mean ablation "
                     f"{f('ce_recovered_mean', d['ce_recovered_mean'], iv=civ)})  KL {f('kl', d['kl'], iv=civ)}  on "
                     f"{d['n_tokens']:,} positions in {d.get('n_sequences', '?')} sequences")
    return "\n".join(lines)
