"""Reconstruction and sparsity metrics, defined once (see DESIGN.md) and used everywhere."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from .sae import SAE

DENSE_FRACTION = 0.10  # a latent firing on more than 10% of tokens is "dense"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x||^2"""
    return float((x - x_hat).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (1 - explained variance)"""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean per-token cosine similarity of x and x_hat."""
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


class _Accumulator:
    """Streams batches and keeps the sums the metrics need."""

    def __init__(self, d_sae: int):
        self.err = self.norm = self.cos = 0.0
        self.sum_x = None
        self.sum_x2 = 0.0
        self.n = 0
        self.fires = torch.zeros(d_sae, dtype=torch.long)
        self.l0: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.err += float((x - x_hat).pow(2).sum())
        self.norm += float(x.pow(2).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_x2 += float(x.pow(2).sum())
        self.n += x.shape[0]
        active = z != 0
        self.fires += active.sum(0).cpu()
        self.l0.append(active.sum(-1).cpu())

    def result(self) -> dict:
        var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n  # sum ||x - mean||^2
        per_token = torch.cat(self.l0).float()
        density = self.fires.double() / self.n
        q = torch.quantile(per_token, torch.tensor(QUANTILES)).tolist()
        return {
            "n_tokens": self.n,
            "nmse": self.err / max(self.norm, 1e-30),
            "fvu": self.err / max(var, 1e-30),
            "explained_variance": 1 - self.err / max(var, 1e-30),
            "cosine": self.cos / self.n,
            "l0": float(per_token.mean()),
            "l0_std": float(per_token.std()) if per_token.numel() > 1 else 0.0,
            "l0_quantiles": {str(k): v for k, v in zip(QUANTILES, q)},
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((density > DENSE_FRACTION).double().mean()),
            "_per_token_l0": per_token,
            "_density": density,
        }


@torch.no_grad()
def per_token_l0(sae: SAE, store, n_tokens: int | None = None, mode: str | None = None,
                 batch_size: int = 4096) -> np.ndarray:
    """Active-latent count of each of a store's first n_tokens (inference mode unless `mode`)."""
    n = len(store) if n_tokens is None else min(n_tokens, len(store))
    hook = sae.cfg.hook_name if sae.cfg.hook_name in store.hooks else None
    batches = (store.rows(s, min(s + batch_size, n), hook).float() for s in range(0, n, batch_size))
    return reconstruction_metrics(sae, batches, mode=mode)["_per_token_l0"].numpy()


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable[torch.Tensor], mode: str | None = None,
                           device: str | torch.device | None = None) -> dict:
    """NMSE, FVU, cosine, L0 (mean, std, quantiles), dead and dense fractions over batches of x.

    BatchTopK uses threshold mode unless mode="batch", so results do not depend on batch size.
    Keys starting with "_" hold tensors: per-token L0 and per-latent firing density.
    """
    device = device or next(sae.parameters()).device
    was_training = sae.training
    sae.eval()
    acc = _Accumulator(sae.cfg.d_sae)
    try:
        for x in batches:
            x = x.to(device).float()
            z, x_hat = sae(x, mode=mode)
            acc.add(x, x_hat, z)
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
    """The JSON-safe part of a metrics dict (drops tensor-valued keys)."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# downstream: the SAE spliced into the model at its hook (nnsight patching)

SCHEMA = "saekit.eval/1"


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
    """
    return ce_metrics_many([sae], model, tokens, keep, hook=hook, mode=mode, seq_batch=seq_batch,
                           mean_activation=mean_activation, progress=progress)[0]


@torch.no_grad()
def ce_metrics_many(saes: Sequence[SAE], model, tokens, keep, hook: str | None = None, mode: str | None = None,
                    seq_batch: int = 8, mean_activation: torch.Tensor | None = None, progress: bool = False,
                    error_splice: bool | Sequence[bool] = True) -> list[dict]:
    """ce_metrics for several SAEs at one hook: the clean, zero- and mean-ablated forwards (and the mean
    activation) are computed once and shared; each SAE adds its own spliced forward (and the
    `x_hat + error` check where error_splice, one flag or one per SAE, says so)."""
    splice_err = [error_splice] * len(saes) if isinstance(error_splice, bool) else list(error_splice)
    import numpy as np
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
    shared = {k: 0.0 for k in ("clean", "zero", "mean")}
    own = [{k: 0.0 for k in ("sae", "sae_plus_error", "kl_sae", "kl_sae_plus_error")} for _ in saes]
    n = 0
    bar = tqdm(range(0, tokens.shape[0], seq_batch), desc="CE", disable=not progress)
    try:
        for b in bar:
            ids = tokens[b:b + seq_batch].to(device)
            keep_b = keep[b:b + seq_batch]
            target = keep_b[:, 1:].to(device)
            clean = _patched_logits(model, ids, hp)
            logp_clean = clean.log_softmax(-1)
            shared["clean"] += float(_token_ce(clean, ids)[target].sum())
            for name, fn in (("zero", lambda x: torch.zeros_like(x)),
                             ("mean", lambda x: mean_activation.to(x.device).expand_as(x))):
                shared[name] += float(_token_ce(_patched_logits(model, ids, hp, splice(fn, device)), ids)[target].sum())
            for sae, sums, with_err in zip(saes, own, splice_err):
                dev = next(sae.parameters()).device
                runs = {"sae": lambda x, sae=sae: sae(x, mode=mode).x_hat}
                if with_err:
                    runs["sae_plus_error"] = lambda x, sae=sae: (lambda x_hat: x_hat + (x - x_hat))(sae(x, mode=mode).x_hat)
                for name, fn in runs.items():
                    logits = _patched_logits(model, ids, hp, splice(fn, dev))
                    sums[name] += float(_token_ce(logits, ids)[target].sum())
                    kl = (logp_clean.exp() * (logp_clean - logits.log_softmax(-1))).sum(-1)[:, :-1]
                    sums[f"kl_{name}"] += float(kl[target].sum())
            n += int(target.sum())
    finally:
        for s, t in zip(saes, was_training):
            s.train(t)
    if n == 0:
        raise ValueError("no positions to score: the sequences hold no kept next-token targets")
    results = []
    for sums, with_err in zip(own, splice_err):
        ce = {k: v / n for k, v in {**shared, **sums}.items()}
        rec = lambda abl: (ce[abl] - ce["sae"]) / (ce[abl] - ce["clean"]) if ce[abl] != ce["clean"] else float("nan")
        results.append({
            "n_tokens": n, "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"], "ce_recovered": rec("zero"), "ce_recovered_mean": rec("mean"),
            "ce_delta": ce["sae"] - ce["clean"], "kl": ce["kl_sae"],
            "ce_sae_plus_error": ce["sae_plus_error"] if with_err else None,
            "kl_sae_plus_error": ce["kl_sae_plus_error"] if with_err else None,
        })
    return results


def evaluate(sae: SAE, model=None, data=None, n_tokens: int = 20_000, ce_tokens: int = 4096,
             mode: str | None = None, batch_size: int = 4096, seq_batch: int = 8, hook: str | None = None,
             progress: bool = False) -> dict:
    """All metrics of one SAE, in a stable JSON-able dict (schema "saekit.eval/1", see README).

    data: an ActivationStore (or its folder) or PackedTokens. Reconstruction and sparsity use up to
    n_tokens activations; the downstream CE metrics (needs `model`) use the first sequences holding
    ce_tokens scored positions. BatchTopK uses threshold mode unless mode="batch".
    """
    from pathlib import Path

    import numpy as np

    from .activations import ActivationStore, forward_hooks
    from .data import PackedTokens
    from .models import resolve_hook, underlying

    hook = hook or sae.cfg.hook_name
    if isinstance(data, (str, Path)):
        data = ActivationStore(data)
    if isinstance(data, ActivationStore):
        n = min(n_tokens, len(data))
        h = hook if hook in data.hooks else None  # the SAE's hook where the store has it
        def make_batches():
            return (data.rows(s, min(s + batch_size, n), h) for s in range(0, n, batch_size))
        tokens, pos = data.tokens, data.positions()
        keep = np.zeros(tokens.shape, dtype=bool)
        keep[pos[:, 0], pos[:, 1]] = True
    elif isinstance(data, PackedTokens):
        if model is None:
            raise ValueError("evaluating on a corpus needs the model to compute activations")
        hp = resolve_hook(model, hook)
        device = next(underlying(model).parameters()).device
        n_seq = data.sequences_for(n_tokens)
        tokens, keep = data.tokens, data.keep

        def make_batches():
            for b in range(0, n_seq, seq_batch):
                v = forward_hooks(model, torch.from_numpy(tokens[b:b + seq_batch].astype(np.int64)).to(device), [hp])[0]
                yield v[torch.from_numpy(keep[b:b + seq_batch]).to(v.device)]
    else:
        raise ValueError(f"evaluate() takes an ActivationStore, its folder or PackedTokens, not {type(data).__name__}")
    rec = reconstruction_metrics(sae, make_batches(), mode=mode)
    hist = l0_histogram(rec["_per_token_l0"])
    c = sae.cfg
    # Matryoshka: every nested prefix is evaluated as an SAE of its own; the CE baselines are shared
    subs = [sae.prefix(g) for g in range(1, len(c.group_sizes) + 1)] if hasattr(sae, "prefix") else []
    downstream, sub_ce = None, [{} for _ in subs]
    if model is not None:
        rows = np.cumsum(keep[:, 1:].sum(1))
        n_seq = min(int(np.searchsorted(rows, ce_tokens)) + 1, tokens.shape[0])
        ce = ce_metrics_many([sae, *subs], model, tokens[:n_seq], keep[:n_seq], hook=hook, mode=mode,
                             seq_batch=seq_batch, progress=progress, error_splice=[True] + [False] * len(subs))
        downstream, sub_ce = ce[0], ce[1:]
    prefixes = None
    if subs:
        prefixes = []
        for g, (sub, d) in enumerate(zip(subs, sub_ce), start=1):
            r = reconstruction_metrics(sub, make_batches(), mode=mode)
            prefixes.append({"groups": g, "width": sub.cfg.d_sae,
                             **{k: r[k] for k in ("nmse", "fvu", "explained_variance", "cosine")}, "l0": r["l0"],
                             "ce_recovered": d.get("ce_recovered"), "kl": d.get("kl")})
    out = {
        "schema": SCHEMA,
        "sae": {"architecture": c.arch, "d_in": c.d_in, "d_sae": c.d_sae,
                "k": c.k if c.arch in ("batchtopk", "topk", "matryoshka") else None, "target_l0": c.target_l0,
                "l1_coeff": c.l1_coeff if c.arch == "relu" else None,
                "hook_name": hook, "model_name": c.model_name},
        "mode": mode or ("threshold" if c.arch in ("batchtopk", "matryoshka") else "default"),
        "n_tokens": rec["n_tokens"],
        "reconstruction": {k: rec[k] for k in ("nmse", "fvu", "explained_variance", "cosine")},
        "sparsity": {"l0": rec["l0"], "l0_std": rec["l0_std"], "l0_quantiles": rec["l0_quantiles"],
                     "l0_histogram": hist, "dead_fraction": rec["dead_fraction"],
                     "dense_fraction": rec["dense_fraction"]},
        "downstream": downstream,
    }
    if prefixes is not None:
        out["sae"]["group_sizes"] = list(c.group_sizes)
        out["prefixes"] = prefixes
    return out
