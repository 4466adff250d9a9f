"""evaluate(): every metric of one or several SAEs in one JSON-able dict (schema "saekit.eval/2"),
and describe(), the one printout of it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..sae import SAE
from .downstream import CE_TOKENS, ce_metrics_many, sample_sequences
from .intervals import LEVEL, N_BOOT
from .reconstruction import l0_histogram, reconstruction_metrics_many

SCHEMA = "saekit.eval/2"


def evaluate(
    sae: SAE,
    model=None,
    data=None,
    n_tokens: int = 20_000,
    ce_tokens: int = CE_TOKENS,
    mode: str | None = None,
    batch_size: int = 4096,
    seq_batch: int = 8,
    hook: str | None = None,
    progress: bool = False,
    seed: int = 0,
    allow_mismatch: bool = False,
) -> dict:
    """All metrics of one SAE, in a stable JSON-able dict (schema "saekit.eval/2", docs/numbers.md).

    data: an ActivationStore (or its folder) or PackedTokens. Reconstruction and sparsity use up to
    n_tokens activations, the downstream CE metrics (needs `model`) ce_tokens scored positions; both
    from sequences drawn at random (seeded) from the whole data, not its first ones. NMSE, L0, CE
    recovered and KL carry 95% bootstrap intervals over sequences ("intervals"); "per_sequence"
    keeps the sums behind them so paired_difference() can compare two SAEs. BatchTopK uses threshold
    mode unless mode="batch"; its batch-mode L0 and the ratio of the two are reported too.
    The data and the model must be the SAE's (hook, model, width; saekit.plumbing.checks) unless
    allow_mismatch.
    """
    return evaluate_many(
        [sae],
        model,
        data,
        n_tokens,
        ce_tokens,
        mode,
        batch_size,
        seq_batch,
        hook,
        progress,
        seed,
        allow_mismatch=allow_mismatch,
    )[0]


def evaluate_many(
    saes: Sequence[SAE],
    model=None,
    data=None,
    n_tokens: int = 20_000,
    ce_tokens: int = CE_TOKENS,
    mode: str | None = None,
    batch_size: int = 4096,
    seq_batch: int = 8,
    hook: str | None = None,
    progress: bool = False,
    seed: int = 0,
    error_splice: bool = True,
    allow_mismatch: bool = False,
) -> list[dict]:
    """evaluate() for several SAEs at one hook on the same sequences: the clean, zero- and
    mean-ablated forwards are made once for all of them (ce_metrics_many), so their results pair up
    exactly. error_splice=False skips the `x_hat + error` check (one forward per SAE)."""
    from pathlib import Path

    from ..activations import ActivationStore, open_store
    from ..data import PackedTokens
    from ..plumbing.checks import hook_on_model, one_hook

    if isinstance(data, (str, Path)):
        data = open_store(data)
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1 (got {n_tokens})")
    if isinstance(data, ActivationStore):
        source = _StoreSource(data, saes, hook, allow_mismatch, n_tokens, seed, batch_size)
    elif isinstance(data, PackedTokens):
        source = _CorpusSource(data, saes, model, hook, allow_mismatch, n_tokens, seed, seq_batch)
    else:
        raise ValueError(
            "evaluate() takes an ActivationStore, its folder or PackedTokens, not "
            f"{type(data).__name__}"
        )
    hook = source.hook
    # Matryoshka: every nested prefix is evaluated as an SAE of its own; the CE
    # baselines are shared by all
    subs = [s.prefixes() if s.has_prefixes else [] for s in saes]
    ce_all = None
    if model is not None:  # the CE metrics splice each SAE into this model at `hook`
        hook = one_hook({hook_on_model(sae, model, hook, allow_mismatch) for sae in saes})
        ce = dict(hook=hook, mode=mode, seq_batch=seq_batch, progress=progress)
        ce_all = iter(_ce_of_all(saes, subs, model, source, ce_tokens, seed, error_splice, ce))
    identity = data_identity(data)
    results = []
    for sae, sb in zip(saes, subs):
        downstream = next(ce_all) if ce_all is not None else None
        sub_ce = [next(ce_all) for _ in sb] if ce_all is not None else [{} for _ in sb]
        one = _one_evaluation(
            sae, sb, downstream, sub_ce, source.batches, mode, hook, len(source.chosen)
        )
        results.append({**one, "data": identity})
    return results


class _StoreSource:
    """A store's activations at the SAEs' one hook, on sequences sampled from it."""

    def __init__(self, data, saes, hook, allow_mismatch, n_tokens, seed, batch_size):
        from ..plumbing.checks import hook_on_store, one_hook

        # every SAE on the same hook of the store, each checked against it
        self.hook = one_hook({hook_on_store(sae, data, hook, allow_mismatch) for sae in saes})
        self.data, self.batch_size = data, batch_size
        self.tokens, self.pos, self.keep = data.tokens, data.positions(), data.keep_mask()
        self.chosen = sample_sequences(self.keep, n_tokens, seed)
        self.rows = np.flatnonzero(np.isin(self.pos[:, 0], self.chosen))[:n_tokens]

    def batches(self):
        """(activations, the sequence of each row) in batches of batch_size rows."""
        from ..plumbing.checks import require_finite

        for s in range(0, self.rows.size, self.batch_size):
            r = self.rows[s : s + self.batch_size]
            x = self.data.take(r, self.hook)
            require_finite(x, self.data, r)
            yield x, torch.from_numpy(self.pos[r, 0].astype(np.int64))


class _CorpusSource:
    """The model's activations at the SAEs' one hook, computed live on sampled sequences."""

    def __init__(self, data, saes, model, hook, allow_mismatch, n_tokens, seed, seq_batch):
        from ..models import resolve_hook, underlying
        from ..plumbing.checks import hook_on_model, one_hook

        if model is None:
            raise ValueError("evaluating on a corpus needs the model to compute activations")
        self.hook = one_hook({hook_on_model(sae, model, hook, allow_mismatch) for sae in saes})
        self.model, self.seq_batch = model, seq_batch
        self.hp = resolve_hook(model, self.hook)
        self.device = next(underlying(model).parameters()).device
        self.tokens, self.keep = data.tokens, data.keep
        self.chosen = sample_sequences(self.keep, n_tokens, seed)

    def batches(self):
        """(the kept positions' activations, the sequence of each) a few sequences at a time."""
        from ..activations import forward_hooks
        from ..plumbing.checks import require_finite

        for b in range(0, self.chosen.size, self.seq_batch):
            idx = self.chosen[b : b + self.seq_batch]
            ids = torch.from_numpy(self.tokens[idx].astype(np.int64)).to(self.device)
            v = forward_hooks(self.model, ids, [self.hp])[0]
            kb = torch.from_numpy(self.keep[idx])
            kept = v[kb.to(v.device)]
            require_finite(kept, what=f"the model's activations at {self.hook}")
            seq = torch.from_numpy(idx.astype(np.int64))[:, None].expand(kb.shape)[kb]
            yield kept, seq


def _ce_of_all(saes, subs, model, source, ce_tokens, seed, error_splice, ce: dict) -> list[dict]:
    """The CE metrics of every SAE and every prefix, in that order, on shared sequences."""
    ce_seq = sample_sequences(source.keep, ce_tokens, seed, targets=True)
    flat = [x for sae, sb in zip(saes, subs) for x in (sae, *sb)]
    flags = [f for sb in subs for f in (error_splice, *([False] * len(sb)))]
    return ce_metrics_many(
        flat,
        model,
        source.tokens[ce_seq],
        source.keep[ce_seq],
        error_splice=flags,
        seq_index=ce_seq,
        **ce,
    )


def data_identity(data) -> dict:
    """What an evaluation was made on, whatever path it lies at: the hash of its token ids (which
    its sequence numbers index), and for a store its model, rows and dtype. `saekit compare` pairs
    sequences only between evaluations of one identity."""
    from ..activations import ActivationStore, StoreError
    from ..data import tokens_sha256

    if not isinstance(data, ActivationStore):  # packed tokens: the model reads them live
        return {"kind": "tokens", "tokens_sha256": tokens_sha256(data.tokens)}
    m = data.manifest
    sha = m.get("tokens_sha256")
    if sha is None:
        try:
            sha = tokens_sha256(data.tokens)
        except StoreError:  # a SAELens cache without token ids
            sha = None
    return {
        "kind": "store",
        "tokens_sha256": sha,
        "model": m.get("model"),
        "n_rows": len(data),
        "dtype": data.dtype,
    }


RECONSTRUCTION = ("nmse", "mse_normalized", "fvu", "explained_variance", "cosine")


def _one_evaluation(sae, subs, downstream, sub_ce, make_batches, mode, hook, n_sequences) -> dict:
    """evaluate()'s dict for one SAE, given its (and its prefixes') CE results."""
    # one pass over the data for the SAE, its batch-mode code (theta's SAEs) and its
    # prefixes (Matryoshka)
    batch_mode = sae.has_theta and mode in (None, "threshold")
    runs = [(sae, mode)] + [(sae, "batch")] * batch_mode + [(sub, mode) for sub in subs]
    rec, *others = reconstruction_metrics_many(runs, make_batches())
    batch_l0 = others.pop(0)["l0"] if batch_mode else None
    downstream = dict(downstream) if downstream is not None else None
    per_sequence = {"recon": rec.get("_per_sequence")}
    if downstream is not None:
        per_sequence["ce"] = downstream.pop("_per_sequence")
    intervals = {**rec.get("intervals", {}), **((downstream or {}).get("intervals") or {})}
    out = {
        "schema": SCHEMA,
        "sae": _sae_record(sae, hook),
        "mode": mode or sae.modes[0],
        "n_tokens": rec["n_tokens"],
        "n_sequences": n_sequences,
        "reconstruction": {k: rec[k] for k in RECONSTRUCTION},
        "sparsity": _sparsity(rec, batch_l0),
        "downstream": downstream,
        "intervals": intervals,
        "interval_method": {
            "level": LEVEL,
            "method": "percentile bootstrap over sequences",
            "n_boot": N_BOOT,
            "seed": 0,
        },
        "per_sequence": per_sequence,
    }
    if subs:
        out["sae"]["group_sizes"] = list(sae.cfg.group_sizes)
        out["prefixes"] = [_prefix_row(g, *z) for g, z in enumerate(zip(subs, sub_ce, others), 1)]
    return out


def _sae_record(sae, hook: str) -> dict:
    """What an evaluation records of the SAE it evaluated."""
    c = sae.cfg
    return {
        "architecture": c.arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "k": sae.sparsity_settings(c).get("k"),
        "target_l0": c.target_l0,
        "l1_coeff": sae.sparsity_settings(c).get("l1_coeff"),
        "hook_name": hook,
        "model_name": c.model_name,
        "theta": float(sae.threshold) if sae.has_theta else None,
        "theta_info": sae.theta_info,
    }


def _sparsity(rec: dict, batch_l0: float | None) -> dict:
    """L0 and its spread, dead and dense latents; for θ's SAEs the batch-coupled training-time L0
    next to the threshold's that replaces it."""
    sparsity = {
        "l0": rec["l0"],
        "l0_std": rec["l0_std"],
        "l0_quantiles": rec["l0_quantiles"],
        "l0_histogram": l0_histogram(rec["_per_token_l0"]),
        "dead_fraction": rec["dead_fraction"],
        "dense_fraction": rec["dense_fraction"],
    }
    if batch_l0 is not None:
        sparsity.update(
            {
                "l0_batch_mode": batch_l0,
                "l0_threshold_mode": rec["l0"],
                "l0_threshold_over_batch": rec["l0"] / batch_l0 if batch_l0 else float("nan"),
            }
        )
    return sparsity


def _prefix_row(groups: int, sub, ce: dict, rec: dict) -> dict:
    """A Matryoshka prefix of `groups` groups: its reconstruction, L0 and CE figures."""
    return {
        "groups": groups,
        "width": sub.cfg.d_sae,
        **{k: rec[k] for k in RECONSTRUCTION},
        "l0": rec["l0"],
        "ce_recovered": ce.get("ce_recovered"),
        "kl": ce.get("kl"),
        "intervals": {**rec.get("intervals", {}), **(ce.get("intervals") or {})},
    }


def describe(m: dict) -> str:
    """evaluate()'s result as a few readable lines, each figure with its 95% interval."""

    def f(name, value, digits=4, iv=m.get("intervals") or {}):
        lo_hi = iv.get(name)
        return f"{value:.{digits}f}" + (
            f" [{lo_hi[0]:.{digits}f}, {lo_hi[1]:.{digits}f}]" if lo_hi else ""
        )

    r, sp, d = m["reconstruction"], m["sparsity"], m["downstream"]
    s = m["sae"]
    lines = [
        f"{s['architecture']} SAE, {s['d_sae']:,} latents, {m['mode']} mode, on "
        f"{m['n_tokens']:,} tokens ({m.get('n_sequences', '?')} sequences); 95% "
        "bootstrap intervals over sequences in brackets",
        f"  NMSE {f('nmse', r['nmse'])}  (paper's logged MSE, normalised space: "
        f"{f('mse_normalized', r['mse_normalized'])})  FVU {r['fvu']:.4f}  cosine "
        f"{r['cosine']:.4f}",
        f"  L0 {f('l0', sp['l0'], 2)} (std {sp['l0_std']:.1f})  dead {sp['dead_fraction']:.3f}  "
        f"dense {sp['dense_fraction']:.3f}",
    ]
    if "l0_batch_mode" in sp:
        target = s.get("k")
        lines.append(
            f"  L0 threshold mode {sp['l0_threshold_mode']:.2f} / batch mode "
            f"{sp['l0_batch_mode']:.2f} = "
            f"{sp['l0_threshold_over_batch']:.3f} (k = {target}; theta = {s['theta']:.4f}, "
            f"{(s.get('theta_info') or {}).get('source', 'training')})"
        )
    if d:
        lines.append(
            f"  CE clean {d['ce_clean']:.4f}  with SAE {d['ce_sae']:.4f}  zero-ablated "
            f"{d['ce_zero_ablation']:.4f}"
            f"  mean-ablated {d['ce_mean_ablation']:.4f}  (nats/token)"
        )
        civ = d.get("intervals") or {}
        lines.append(
            f"  CE recovered {f('ce_recovered', d['ce_recovered'], iv=civ)} (vs mean ablation "
            f"{f('ce_recovered_mean', d['ce_recovered_mean'], iv=civ)})  KL "
            f"{f('kl', d['kl'], iv=civ)}  on "
            f"{d['n_tokens']:,} positions in {d.get('n_sequences', '?')} sequences"
        )
    return "\n".join(lines)
