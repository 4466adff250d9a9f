"""SAEBench's core evaluation: reconstruction, shrinkage, sparsity, feature density, the model's
loss and KL with the SAE spliced in, and per-latent weight statistics, with SAEBench 0.6.0's
definitions (docs/bench.md says where they differ from saekit's own eval)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..sae import SAE
from .output import eval_output


@dataclass(frozen=True)
class CoreConfig:
    """SAEBench's CoreEvalConfig fields, with the values this evaluation used."""

    model_name: str = ""
    llm_dtype: str = "float32"
    batch_size_prompts: int = 16
    n_eval_reconstruction_batches: int = 8
    n_eval_sparsity_variance_batches: int = 8
    dataset: str = "bundled"
    context_size: int = 128
    compute_kl: bool = True
    compute_ce_loss: bool = True
    compute_l2_norms: bool = True
    compute_sparsity_metrics: bool = True
    compute_variance_metrics: bool = True
    compute_featurewise_density_statistics: bool = True
    compute_featurewise_weight_based_metrics: bool = True
    exclude_special_tokens_from_reconstruction: bool = True
    verbose: bool = False


def max_other_cosine(columns_DF: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each column, its largest cosine with any other column: [F] (chunked: no F x F
    matrix)."""
    unit_DF = torch.nn.functional.normalize(columns_DF.float(), dim=0)
    n = unit_DF.shape[1]
    out_F = torch.empty(n)
    for start in range(0, n, chunk):
        sims_CF = unit_DF[:, start : start + chunk].T @ unit_DF
        rows = torch.arange(sims_CF.shape[0])
        sims_CF[rows, rows + start] = -float("inf")  # not itself
        out_F[start : start + chunk] = sims_CF.max(1).values
    return out_F


def weight_metrics(sae: SAE) -> dict[str, torch.Tensor]:
    """Per-latent encoder norm and bias, encoder-decoder cosine, and each latent's largest cosine
    with another latent's encoder and decoder direction."""
    W_enc_DF = sae.W_enc.detach().float().cpu()
    W_dec_FD = sae.W_dec.detach().float().cpu()
    return {
        "encoder_bias": sae.b_enc.detach().float().cpu(),
        "encoder_norm": W_enc_DF.norm(dim=0),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(
            W_enc_DF.T, W_dec_FD, dim=1
        ),
        "max_encoder_cosine_sim": max_other_cosine(W_enc_DF),
        "max_decoder_cosine_sim": max_other_cosine(W_dec_FD.T),
    }


class _Sums:
    """What the sparsity and variance pass adds up, batch by batch (SAEBench averages per-token
    values over tokens, and a few per-batch values over batches)."""

    def __init__(self, d_sae: int):
        self.per_token = {k: [] for k in ("l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio")}
        self.per_token.update({k: [] for k in ("explained_variance_legacy", "mse", "cossim")})
        self.per_batch = {k: [] for k in ("relative_reconstruction_bias", "x_sq", "x_sq_dim")}
        self.per_batch["resid_sq"] = []
        self.fires_F = torch.zeros(d_sae, dtype=torch.float64)
        self.prompts_F = torch.zeros(d_sae, dtype=torch.float64)
        self.n_tokens = 0
        self.x_sum = None

    def add(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, z_NF: torch.Tensor, seq_N):
        n = x_ND.shape[0]
        resid_sq_N = (x_ND - x_hat_ND).pow(2).sum(-1)
        norm_in_N, norm_out_N = x_ND.norm(dim=-1), x_hat_ND.norm(dim=-1)
        t = self.per_token
        t["l0"].append((z_NF != 0).sum(-1).float())
        t["l1"].append(z_NF.sum(-1))
        t["l2_norm_in"].append(norm_in_N)
        t["l2_norm_out"].append(norm_out_N)
        t["l2_ratio"].append(norm_out_N / norm_in_N.masked_fill(norm_in_N.abs() < 1e-4, 1.0))
        centred_sq_N = (x_ND - x_ND.mean(0)).pow(2).sum(-1)
        t["explained_variance_legacy"].append(1 - resid_sq_N / centred_sq_N)
        t["mse"].append(resid_sq_N / n)  # SAEBench divides by the batch's token count
        t["cossim"].append((x_ND * x_hat_ND).sum(-1) / (norm_in_N * norm_out_N))
        b = self.per_batch
        b["relative_reconstruction_bias"].append(
            (norm_out_N.pow(2).mean() / (x_ND * x_hat_ND).sum(-1).mean()).reshape(1)
        )
        b["x_sq"].append(x_ND.pow(2).sum(-1).mean())
        b["x_sq_dim"].append(x_ND.pow(2).mean(0))
        b["resid_sq"].append(resid_sq_N.mean())
        fired_NF = (z_NF > 0).double()
        self.fires_F += fired_NF.sum(0)
        for s in np.unique(seq_N):  # prompts where each latent fired at least once
            self.prompts_F += (fired_NF[torch.from_numpy(seq_N == s)].sum(0) > 0).double()
        self.n_tokens += n
        s = x_ND.double().sum(0)
        self.x_sum = s if self.x_sum is None else self.x_sum + s

    def metrics(self) -> dict:
        out = {k: torch.cat(v).mean().item() for k, v in self.per_token.items()}
        b = self.per_batch
        out["relative_reconstruction_bias"] = (
            torch.cat(b["relative_reconstruction_bias"]).mean().item()
        )
        # SAEBench 0.6.0's total variance: mean ||x||^2 minus the square of the mean of x^2
        total = torch.stack(b["x_sq"]).mean() - torch.cat(b["x_sq_dim"]).mean() ** 2
        out["explained_variance"] = (1 - torch.stack(b["resid_sq"]).mean() / total).item()
        return out


def _activations(model, tokens, keep, hp, batch: int, progress: bool, desc: str):
    """(x [n, d] at the kept positions, the sequence of each row) for batches of sequences."""
    from ..activations import forward_hooks
    from ..plumbing.checks import require_finite

    for b in tqdm(range(0, tokens.shape[0], batch), desc=desc, disable=not progress):
        ids = torch.from_numpy(np.asarray(tokens[b : b + batch], dtype=np.int64))
        kb = torch.from_numpy(np.asarray(keep[b : b + batch], dtype=bool))
        x = forward_hooks(model, ids, [hp])[0].float().cpu()[kb]
        require_finite(x, what=f"the activations of sequences {b}..{b + len(ids) - 1}")
        yield x, (np.nonzero(kb.numpy())[0] + b)


@torch.no_grad()
def core_eval(
    saes: list[SAE], model, tokens, keep, config: CoreConfig | None = None, progress: bool = True
) -> list[dict]:
    """SAEBench's core evaluation of SAEs that read one hook of `model`, over the token sequences
    `tokens` [n, T] at the positions `keep` marks (BOS is never one): an SAEBench output document
    per SAE. The model's activations and its clean and zero-ablated forwards are computed once for
    all of them. The first n_eval_sparsity_variance_batches x batch_size_prompts sequences feed the
    sparsity and variance metrics, the first n_eval_reconstruction_batches x batch_size_prompts the
    loss and KL."""
    from ..metrics import ce_metrics_many
    from ..models import model_name, resolve_hook

    cfg = config or CoreConfig(model_name=model_name(model), context_size=int(tokens.shape[1]))
    hooks = {sae.cfg.hook_name for sae in saes}
    if len(hooks) != 1:
        raise ValueError(f"core_eval takes SAEs of one hook; these read {sorted(hooks)}")
    hp = resolve_hook(model, hooks.pop())
    was_training = [sae.training for sae in saes]
    sums = [_Sums(sae.cfg.d_sae) for sae in saes]
    per = cfg.batch_size_prompts
    n_var = per * cfg.n_eval_sparsity_variance_batches
    try:
        for sae in saes:
            sae.eval()
        for x, seq in _activations(
            model, tokens[:n_var], keep[:n_var], hp, per, progress, "core: sparsity, variance"
        ):
            for sae, acc in zip(saes, sums):
                z, x_hat = sae(x.to(next(sae.parameters()).device))
                acc.add(x, x_hat.float().cpu(), z.float().cpu(), seq)
    finally:
        for sae, training in zip(saes, was_training):
            sae.train(training)
    n_rec = per * cfg.n_eval_reconstruction_batches
    mean_x = (sums[0].x_sum / max(sums[0].n_tokens, 1)).float()
    ces = ce_metrics_many(
        saes, model, tokens[:n_rec], keep[:n_rec], seq_batch=per, mean_activation=mean_x,
        progress=progress, error_splice=False,
    )  # fmt: skip
    return [_document(sae, acc, ce, cfg) for sae, acc, ce in zip(saes, sums, ces)]


def _document(sae: SAE, sums: _Sums, ce: dict, cfg: CoreConfig) -> dict:
    m = sums.metrics()
    density_F = sums.fires_F / max(sums.n_tokens, 1)
    consistent_F = sums.fires_F / sums.prompts_F.clamp(min=1)
    weights = weight_metrics(sae)
    metrics = {
        "model_behavior_preservation": {
            "kl_div_score": (ce["kl_zero_ablation"] - ce["kl"]) / ce["kl_zero_ablation"],
            "kl_div_with_ablation": ce["kl_zero_ablation"],
            "kl_div_with_sae": ce["kl"],
        },
        "model_performance_preservation": {
            "ce_loss_score": ce["ce_recovered"],
            "ce_loss_with_ablation": ce["ce_zero_ablation"],
            "ce_loss_with_sae": ce["ce_sae"],
            "ce_loss_without_sae": ce["ce_clean"],
        },
        "reconstruction_quality": {
            k: m[k] for k in ("explained_variance", "explained_variance_legacy", "mse", "cossim")
        },
        "shrinkage": {
            k: m[k]
            for k in ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias")
        },
        "sparsity": {"l0": m["l0"], "l1": m["l1"]},
        "token_stats": {
            "total_tokens_eval_reconstruction": int(ce["n_tokens"]),
            "total_tokens_eval_sparsity_variance": int(sums.n_tokens),
        },
        "misc_metrics": misc_metrics(density_F, weights),
    }
    details = [
        {
            "index": i,
            "feature_density": float(density_F[i]),
            "consistent_activation_heuristic": float(consistent_F[i]),
            **{k: float(v[i]) for k, v in weights.items()},
        }
        for i in range(sae.cfg.d_sae)
    ]
    # saekit's own definitions on the same tokens, beside SAEBench's (docs/bench.md)
    unstructured = {
        "saekit": {
            "explained_variance": 1 - _fvu(sums),
            "ce_recovered_intervals": (ce.get("intervals") or {}).get("ce_recovered"),
        }
    }
    return eval_output("core", sae, asdict(cfg), metrics, details, unstructured)


def _fvu(sums: _Sums) -> float:
    """saekit's FVU on the same tokens: sum ||x - x_hat||^2 / sum ||x - mean x||^2."""
    n = sums.n_tokens
    # batches differ in their kept tokens: weight each batch's mean by its tokens
    tokens = torch.tensor([len(t) for t in sums.per_token["l0"]], dtype=torch.float64)
    resid = float((torch.stack(sums.per_batch["resid_sq"]).double() * tokens).sum() / n)
    x_sq = float((torch.stack(sums.per_batch["x_sq"]).double() * tokens).sum() / n)
    mean = sums.x_sum / n
    return resid / (x_sq - float(mean.pow(2).sum()))


def misc_metrics(density_F: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict:
    """SAEBench's summary of feature density and weight geometry."""
    total = float(density_F.sum())
    over1, over10 = density_F > 0.01, density_F > 0.1
    return {
        "freq_over_1_percent": float(over1.double().mean()),
        "freq_over_10_percent": float(over10.double().mean()),
        "normalized_freq_over_1_percent": float(density_F[over1].sum()) / total if total else 0.0,
        "normalized_freq_over_10_percent": float(density_F[over10].sum()) / total if total else 0.0,
        "average_max_encoder_cosine_sim": float(weights["max_encoder_cosine_sim"].mean()),
        "average_max_decoder_cosine_sim": float(weights["max_decoder_cosine_sim"].mean()),
        "frac_alive": float((density_F > 0).double().mean()),
    }
