"""What an SAE does with real text: per-token latent counts (adaptive allocation), token properties
that go with them, and a precomputed index of every latent's activations for the feature
explorer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .activations import ActivationStore, forward_hooks
from .features import FeatureIndex, build_feature_index  # noqa: F401  (re-exported)
from .metrics.downstream import patched_logits
from .models import resolve_hook, underlying
from .plumbing.checks import hook_on_model, hook_on_store, require_finite
from .sae import SAE


def _device(model) -> torch.device:
    return next(underlying(model).parameters()).device


def encode_ids(model, ids: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations [T, d] at `hook` for one sequence of token ids [T]."""
    hp = resolve_hook(model, hook)
    return forward_hooks(model, ids[None].to(_device(model)), [hp])[0][0].float()


def text_ids(model, text: str) -> torch.Tensor:
    """Token ids of a text with BOS in front (as the corpus packer does)."""
    tok = model.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return torch.tensor([bos] + tok(text, add_special_tokens=False).input_ids)


def count_table(z: torch.Tensor, tokens: list[str], kept: np.ndarray, top: int = 5) -> pd.DataFrame:
    """One row per token from its code z [T, d_sae]: active-latent count and strongest latents
    (positions not kept, e.g. BOS, count 0)."""
    z = z.detach().cpu() * torch.from_numpy(kept)[:, None]
    counts = (z != 0).sum(-1).numpy()
    vals, idx = z.topk(min(top, z.shape[1]), dim=-1)
    tops = [
        [(int(j), float(a)) for a, j in zip(v, i) if a > 0]
        for v, i in zip(vals.tolist(), idx.tolist())
    ]
    return pd.DataFrame(
        {
            "position": np.arange(len(tokens)),
            "token": tokens,
            "count": counts,
            "kept": kept,
            "top_latents": tops,
        }
    )


def token_latents(sae: SAE, z: torch.Tensor, top: int | None = None) -> pd.DataFrame:
    """One token's active latents from its code z [d_sae], strongest first: latent, activation, and
    its share of the reconstruction: the latent's contribution z_j W_dec[j] projected on the decoded
    sum of all of them, over that sum's squared norm (the shares add up to 1; a negative share
    pulls against the rest)."""
    z = z.detach().float().cpu().reshape(-1)
    idx = torch.nonzero(z).reshape(-1)
    vals = z[idx]
    contrib = vals[:, None] * sae.W_dec.detach().float().cpu()[idx]
    total = contrib.sum(0)
    share = contrib @ total / total.dot(total).clamp_min(1e-12)
    order = torch.argsort(vals, descending=True)[:top]
    return pd.DataFrame(
        {
            "latent": idx[order].numpy(),
            "activation": vals[order].numpy(),
            "share": share[order].numpy(),
        }
    )


def text_activations(model, text: str, hook: str) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(activations [T, d], token strings, kept mask) of a text with BOS in front (BOS not kept)."""
    ids = text_ids(model, text)
    acts = encode_ids(model, ids, hook).cpu()
    require_finite(acts, what=f"the model's activations at {hook} on the text")
    tokens = [model.tokenizer.decode([i]) for i in ids.tolist()]
    kept = np.ones(len(tokens), dtype=bool)
    kept[0] = False
    return acts, tokens, kept


def latent_counts(
    sae: SAE,
    model,
    text: str,
    hook: str | None = None,
    mode: str | None = None,
    top: int = 5,
    allow_mismatch: bool = False,
) -> pd.DataFrame:
    """Per-token latent counts over a text: position, token, count, kept (BOS is not), top_latents
    [(latent, activation), ...]. BatchTopK uses its threshold (so each token's count is its own).
    The model and hook must be the SAE's (saekit.plumbing.checks) unless allow_mismatch."""
    acts, tokens, kept = text_activations(
        model, text, hook_on_model(sae, model, hook, allow_mismatch)
    )
    with torch.no_grad():
        z = sae.encode(acts.to(sae.W_enc.device), mode=mode)
    df = count_table(z, tokens, kept, top=top)
    df.insert(1, "token_id", text_ids(model, text).numpy())
    return df


def group_counts(
    sae: SAE, model, text: str, hook: str | None = None, allow_mismatch: bool = False
) -> pd.DataFrame:
    """Matryoshka: each token's active latents split by nested group (which level they come from).
    Columns: position, token, kept, count, and one column per group ("g1 (0-287)", ...)."""
    if not sae.has_prefixes:
        raise ValueError(f"group_counts needs a Matryoshka SAE (this one is {sae.cfg.arch})")
    acts, tokens, kept = text_activations(
        model, text, hook_on_model(sae, model, hook, allow_mismatch)
    )
    with torch.no_grad():
        z = sae.encode(acts.to(sae.W_enc.device)).cpu() * torch.from_numpy(kept)[:, None]
    rows, cols = z.nonzero(as_tuple=True)
    n_groups = len(sae.cfg.group_sizes)
    per = torch.zeros(len(tokens), n_groups, dtype=torch.long)
    per.index_put_((rows, sae.group_of(cols)), torch.ones_like(rows), accumulate=True)
    df = pd.DataFrame(
        {
            "position": np.arange(len(tokens)),
            "token": tokens,
            "kept": kept,
            "count": per.sum(1).numpy(),
        }
    )
    lo = 0
    for g, hi in enumerate(sae.widths):
        df[f"g{g + 1} ({lo}-{hi - 1})"] = per[:, g].numpy()
        lo = hi
    return df


@torch.no_grad()
def token_properties(
    sae: SAE,
    model,
    store: ActivationStore,
    n_tokens: int = 4096,
    mode: str | None = None,
    seq_batch: int = 8,
    hook: str | None = None,
    allow_mismatch: bool = False,
) -> pd.DataFrame:
    """Per token of the store's first sequences: latent count and the properties it may follow:
    position in sequence, corpus frequency of the token, the model's loss on it, the SAE's
    reconstruction error (per-token NMSE) and the activation norm. Store and model must be the
    SAE's."""
    hook = hook_on_store(sae, store, hook, allow_mismatch)
    hook_on_model(sae, model, hook, allow_mismatch)
    pos = store.positions()
    n = min(n_tokens, len(pos))
    pos = pos[:n]
    x = torch.cat(list(store.head_batches(n, n, hook)))
    xs = x.to(sae.W_enc.device)
    z, x_hat = sae(xs, mode=mode)
    counts = (z != 0).sum(-1).cpu().numpy()
    err = ((x_hat.cpu() - x).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)).numpy()
    tokens = np.asarray(store.tokens)
    freq = np.bincount(tokens.reshape(-1), minlength=int(tokens.max()) + 1) / tokens.size
    ids = tokens[pos[:, 0], pos[:, 1]]
    # the model's loss on each token (predicting it from the previous position)
    seqs = np.unique(pos[:, 0])
    loss = np.full(len(pos), np.nan)
    row_of = {(int(s), int(p)): i for i, (s, p) in enumerate(pos)}
    for b in range(0, len(seqs), seq_batch):
        chunk = seqs[b : b + seq_batch]
        ids_b = torch.from_numpy(tokens[chunk].astype(np.int64)).to(_device(model))
        logits = underlying(model)(ids_b).logits.float()
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids_b[:, 1:], reduction="none"
        ).cpu()
        for r, s in enumerate(chunk):
            for p in range(1, tokens.shape[1]):
                i = row_of.get((int(s), p))
                if i is not None:
                    loss[i] = float(ce[r, p - 1])
    readable = {int(i): model.tokenizer.decode([int(i)]) for i in np.unique(ids)}
    return pd.DataFrame(
        {
            "sequence": pos[:, 0],
            "position": pos[:, 1],
            "token_id": ids,
            "token": [readable[int(i)] for i in ids],
            "count": counts,
            "token_frequency": freq[ids],
            "model_loss": loss,
            "recon_error": err,
            "norm": x.norm(dim=-1).numpy(),
        }
    )


def count_by_token(props: pd.DataFrame, min_occurrences: int = 5) -> pd.DataFrame:
    """Mean latent count per token string (tokens seen at least `min_occurrences` times), most
    latents
    first: which kinds of tokens the SAE spends more on."""
    g = (
        props.groupby("token")["count"]
        .agg(["mean", "std", "size"])
        .rename(columns={"size": "occurrences"})
    )
    g = g[g["occurrences"] >= min_occurrences].sort_values("mean", ascending=False)
    return g.reset_index()


def count_correlations(
    props: pd.DataFrame,
    columns=("position", "token_frequency", "model_loss", "recon_error", "norm"),
) -> pd.Series:
    """Spearman correlation of the latent count with each token property."""
    rank = props["count"].rank()
    # Pearson on ranks
    return pd.Series({c: rank.corr(props[c].rank()) for c in columns if c in props})


# ---------------------------------------------------------------------------------------------
# feature index: every latent's activations over a store, computed once


@torch.no_grad()
def logit_effects(sae: SAE, model, latent: int, n: int = 10) -> dict:
    """Tokens the latent's decoder direction promotes and suppresses through the unembedding, with
    the final norm's gain folded in (W_U diag(gamma): the direction is scaled by the norm's weight
    before the unembedding reads it; SAELens's tutorials fold it the same way). "all": the effect
    on every token of the vocabulary."""
    hf = underlying(model)
    W_U = hf.get_output_embeddings().weight.float()  # [vocab, d]
    gain = final_norm_gain(model)
    direction = sae.W_dec[latent].float().to(W_U.device)
    effect = W_U @ (direction * gain.to(W_U.device) if gain is not None else direction)
    up, down = effect.topk(n), (-effect).topk(n)
    dec = model.tokenizer.decode
    return {
        "promoted": [(dec([int(i)]), float(v)) for v, i in zip(up.values, up.indices)],
        "suppressed": [(dec([int(i)]), float(-v)) for v, i in zip(down.values, down.indices)],
        "all": effect.cpu().numpy(),
        "gain_folded": gain is not None,
    }


def final_norm_gain(model) -> torch.Tensor | None:
    """The weight of the model's final normalisation before the unembedding (Llama/SmolLM2
    `model.norm`, GPT-2 `transformer.ln_f`, GPT-NeoX `gpt_neox.final_layer_norm`, ...), or None
    if it has none."""
    hf = underlying(model)
    for path in (
        "model.norm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
        "model.final_layernorm",
    ):
        mod = hf
        for part in path.split("."):
            mod = getattr(mod, part, None)
        w = getattr(mod, "weight", None) if mod is not None else None
        if isinstance(w, torch.Tensor) and w.ndim == 1:
            # Gemma's RMSNorm multiplies by (1 + weight)
            return (1 + w.float()) if "Gemma" in type(mod).__name__ else w.float()
    return None


@torch.no_grad()
def codes_with(
    sae: SAE, acts: torch.Tensor, threshold: float | None = None, k: int | None = None
) -> torch.Tensor:
    """Codes [T, d_sae] under a what-if sparsity setting: a global threshold (keep a_j > threshold)
    or a per-token k (TopK). With neither, the SAE's own inference rule. For the allocation
    explorer."""
    xs, _ = sae.normalize_input(acts.float().to(sae.W_enc.device))
    a = sae.pre_acts(xs)
    if threshold is not None:
        return a * (a > threshold)
    if k is not None:
        v, i = a.topk(min(k, a.shape[1]), dim=-1)
        return torch.zeros_like(a).scatter(-1, i, v)
    return sae.activate(a)


@torch.no_grad()
def top_promoted(
    sae: SAE, model, n: int = 10, chunk: int = 256, progress: bool = False
) -> np.ndarray:
    """[d_sae, n] ids of the tokens each latent's decoder row promotes most (for search by output
    token)."""
    W_U = underlying(model).get_output_embeddings().weight.float()  # [vocab, d]
    out = []
    for s in tqdm(range(0, sae.cfg.d_sae, chunk), desc="logit effects", disable=not progress):
        eff = sae.W_dec[s : s + chunk].float().to(W_U.device) @ W_U.t()  # [chunk, vocab]
        out.append(eff.topk(n, dim=-1).indices.cpu().numpy())
    return np.concatenate(out)


def search_promoted(promoted: np.ndarray, tokenizer, query: str, n: int = 20) -> list[int]:
    """Latents among whose top promoted tokens one contains `query` (case-insensitive)."""
    q = query.lower().strip()
    hits = []
    for lat, ids in enumerate(promoted):
        if any(q in tokenizer.decode([int(i)]).lower() for i in ids):
            hits.append(lat)
            if len(hits) >= n:
                break
    return hits


@torch.no_grad()
def latent_on_text(
    sae: SAE, model, text: str, latent: int, hook: str | None = None, allow_mismatch: bool = False
) -> pd.DataFrame:
    """One latent's activation on every token of a typed text (the SAE's inference code; BOS is 0):
    position, token, activation. For testing a hypothesis about what the latent reads."""
    acts, tokens, kept = text_activations(
        model, text, hook_on_model(sae, model, hook, allow_mismatch)
    )
    z = sae.encode(acts.to(sae.W_enc.device))[:, latent].cpu() * torch.from_numpy(kept)
    return pd.DataFrame({"position": range(len(tokens)), "token": tokens, "activation": z.numpy()})


def _moved_most(p0: torch.Tensor, p1: torch.Tensor, top: int, dec) -> pd.DataFrame:
    """The `top` next tokens whose probability moved most from p0 to p1, with both."""
    moved = (p1 - p0).abs().topk(top).indices
    rows = [
        {
            "token": dec([int(i)]),
            "p_clean": float(p0[i]),
            "p_edited": float(p1[i]),
            "change": float(p1[i] - p0[i]),
        }
        for i in moved
    ]
    return pd.DataFrame(rows)


@torch.no_grad()
def causal_effect(
    sae: SAE,
    model,
    text: str,
    latent: int,
    steer: float | None = None,
    hook: str | None = None,
    top: int = 10,
    allow_mismatch: bool = False,
) -> dict:
    """Edit one latent on a typed text and see what the model predicts next, the clean run beside
    it.

    steer=None ablates the latent (its code set to 0 on every token); a number adds that much to its
    code on every token (steering). The edit is spliced in as the CE metrics splice the SAE: x +
    (x_hat_edited - x_hat), so the SAE's own error stays in and only the latent's contribution
    changes. Returns the next-token distribution after the text, clean and edited ("top": the `top`
    tokens whose probability moved most, with both probabilities), KL(clean || edited) there and
    averaged over the text's positions, and how strongly the latent fired."""
    hook = hook_on_model(sae, model, hook, allow_mismatch)
    hp = resolve_hook(model, hook)
    ids = text_ids(model, text)
    acts = encode_ids(model, ids, hook).to(sae.W_enc.device)
    require_finite(acts, what=f"the model's activations at {hook} on the text")
    xs, ctx = sae.normalize_input(acts)
    z = sae.activate(sae.pre_acts(xs))
    z_edit = z.clone()
    z_edit[1:, latent] = 0.0 if steer is None else z[1:, latent] + steer  # BOS stays clean
    delta = sae.denormalize(z_edit @ sae.W_dec + sae.b_dec, ctx) - sae.denormalize(
        z @ sae.W_dec + sae.b_dec, ctx
    )
    dev = next(underlying(model).parameters()).device
    clean = patched_logits(model, ids[None].to(dev), hp)[0].log_softmax(-1)
    edited = patched_logits(
        model, ids[None].to(dev), hp, lambda v: v + delta.to(v.device, v.dtype)[None]
    )[0].log_softmax(-1)
    kl = (clean.exp() * (clean - edited)).sum(-1)  # [T]
    p0, p1 = clean[-1].exp(), edited[-1].exp()
    dec = model.tokenizer.decode
    return {
        "edit": "ablate" if steer is None else f"steer {steer:+g}",
        "latent": latent,
        "text": text,
        "kl_next": float(kl[-1]),
        "kl_mean": float(kl[1:].mean()) if len(kl) > 1 else float(kl[-1]),
        "fired_on": int((z[1:, latent] > 0).sum()),
        "max_activation": float(z[1:, latent].max()),
        "top": _moved_most(p0, p1, top, dec),
        "clean_top": [(dec([int(i)]), float(p0[i])) for i in p0.topk(5).indices],
        "edited_top": [(dec([int(i)]), float(p1[i])) for i in p1.topk(5).indices],
    }
