"""Sparse autoencoders written plainly: read this first.

Everything saekit trains, in plain PyTorch and dense matrices, top to bottom, as a teacher would
write it on a board. saekit's own SAE classes compute the same losses and gradients faster (sparse
products, fewer passes) and are tested against these functions (tests/sae/test_reference.py).
Shapes: B tokens, D = d_in, F = d_sae. Nothing here imports the rest of saekit.
"""

import torch
import torch.nn.functional as F


def normalize(x_BD: torch.Tensor, how: str = "token", scale: float = 1.0):
    """The SAE works on scaled inputs. "token": each token centred and divided by its std (the
    paper's code); "dataset": one scale for all tokens; "none". Returns the scaled input and what
    undoes it."""
    if how == "token":
        mu_B1 = x_BD.mean(-1, keepdim=True)
        std_B1 = (x_BD - mu_B1).std(-1, keepdim=True)
        return (x_BD - mu_B1) / (std_B1 + 1e-5), (mu_B1, std_B1)
    return x_BD * (scale if how == "dataset" else 1.0), None


def encode(xs_BD, W_enc_DF, b_enc_F, b_dec_D):
    """Pre-activations: relu((x - b_dec) W_enc + b_enc), one number per token and latent."""
    return torch.relu((xs_BD - b_dec_D) @ W_enc_DF + b_enc_F)


def decode(z_BF, W_dec_FD, b_dec_D):
    """Reconstruction: a sum of decoder rows, weighted by the code, plus the decoder bias."""
    return z_BF @ W_dec_FD + b_dec_D


def batch_topk(acts_BF, k: int):
    """BatchTopK: keep the B*k largest pre-activations of the whole batch. Tokens get as many
    latents as they need; the mean per token is exactly k. Returns the code and the cut (the
    smallest value kept), theta's sample."""
    flat = acts_BF.flatten()
    vals, idx = flat.topk(acts_BF.shape[0] * k)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[idx[vals > 0]] = True
    return acts_BF * keep.view_as(acts_BF), vals[vals > 0].min().detach()


def topk(acts_BF, k: int):
    """TopK: keep the k largest pre-activations of each token: every token gets exactly k
    latents."""
    vals, idx = acts_BF.topk(k, dim=-1)
    keep = torch.zeros_like(acts_BF, dtype=torch.bool).scatter(-1, idx, vals > 0)
    return acts_BF * keep


def threshold_code(acts_BF, theta):
    """Inference for BatchTopK (and JumpReLU, with one theta per latent): keep what is above theta.
    A token's code then depends on that token alone, not on the batch it came in."""
    return acts_BF * (acts_BF > theta)


def update_theta(theta: float, n_updates: int, cut: float, beta: float = 0.99) -> float:
    """BatchTopK's theta during training: the mean of the first cuts, then an exponential moving
    average."""
    weight = max(1.0 / (n_updates + 1), 1.0 - beta)
    return theta + weight * (cut - theta)


def estimate_theta(batches_of_acts, k: int) -> float:
    """theta from fixed weights: the mean over batches of the smallest activation BatchTopK
    keeps."""
    cuts = [batch_topk(acts_BF, k)[1] for acts_BF in batches_of_acts]
    return float(torch.stack(cuts).mean())


class _JumpReLU(torch.autograd.Function):
    """z = a * step(a - theta). The step has no useful derivative, so theta gets a
    pseudo-derivative: what the output would change by if the step were a ramp of width
    `bandwidth` (a rectangle kernel around theta)."""

    @staticmethod
    def forward(ctx, acts_BF, theta_F, bandwidth):
        ctx.save_for_backward(acts_BF, theta_F)
        ctx.bandwidth = bandwidth
        return acts_BF * (acts_BF > theta_F)

    @staticmethod
    def backward(ctx, grad_BF):
        acts_BF, theta_F = ctx.saved_tensors
        near_BF = ((acts_BF - theta_F).abs() < ctx.bandwidth / 2).to(grad_BF.dtype)
        grad_theta_F = (-(theta_F / ctx.bandwidth) * near_BF * grad_BF).sum(0)
        return grad_BF * (acts_BF > theta_F), grad_theta_F, None


class _Step(torch.autograd.Function):
    """step(a - theta), counted for the L0 penalty; the same rectangle pseudo-derivative, to
    theta only."""

    @staticmethod
    def forward(ctx, acts_BF, theta_F, bandwidth):
        ctx.save_for_backward(acts_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (acts_BF > theta_F).to(acts_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF):
        acts_BF, theta_F = ctx.saved_tensors
        near_BF = ((acts_BF - theta_F).abs() < ctx.bandwidth / 2).to(grad_BF.dtype)
        return torch.zeros_like(acts_BF), (-(1.0 / ctx.bandwidth) * near_BF * grad_BF).sum(0), None


def jumprelu(acts_BF, log_threshold_F, bandwidth: float):
    """JumpReLU: a learned threshold per latent (kept as its log, so it stays positive). Returns the
    code and its L0 per token, both differentiable to the threshold."""
    theta_F = log_threshold_F.exp()
    return _JumpReLU.apply(acts_BF, theta_F, bandwidth), _Step.apply(
        acts_BF, theta_F, bandwidth
    ).sum(-1)


def auxk(acts_BF, dead_F, k_aux: int, W_dec_FD, residual_BD):
    """AuxK: the k_aux largest pre-activations among dead latents (those that have not fired for a
    while) try to reconstruct what the live ones missed, which gives dead latents a gradient that
    pulls them back to life."""
    dead_acts_BF = acts_BF * dead_F
    n = min(k_aux, int(dead_F.sum()))
    idx = dead_acts_BF.detach().topk(n, dim=-1).indices
    keep = torch.zeros_like(acts_BF, dtype=torch.bool).scatter(-1, idx, True) & dead_F
    return F.mse_loss((acts_BF * keep) @ W_dec_FD, residual_BD.detach())


def loss(params: dict, x_BD, cfg: dict, dead_F=None):
    """The training loss of one batch for cfg["arch"] in batchtopk, topk, matryoshka, jumprelu,
    relu.

    params: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D] (and log_threshold [F] for JumpReLU).
    cfg: k, k_aux, aux_alpha, normalize, l1_coeff, l0_coeff, target_l0, bandwidth, group_sizes,
    input_scale. dead_F: the dead latents (bool), or None. Returns (loss, code z [B, F], the
    scaled input, its reconstruction, the cut or None)."""
    xs_BD, _ = normalize(x_BD, cfg.get("normalize", "token"), cfg.get("input_scale", 1.0))
    acts_BF = encode(xs_BD, params["W_enc"], params["b_enc"], params["b_dec"])
    arch, cut, sparsity = cfg["arch"], None, 0.0
    if arch in ("batchtopk", "matryoshka"):
        z_BF, cut = batch_topk(acts_BF, cfg["k"])
    elif arch == "topk":
        z_BF = topk(acts_BF, cfg["k"])
    elif arch == "jumprelu":
        z_BF, l0_B = jumprelu(acts_BF, params["log_threshold"], cfg["bandwidth"])
        l0, target = l0_B.mean(), cfg.get("target_l0")
        sparsity = cfg["l0_coeff"] * ((l0 / target - 1) ** 2 if target else l0 / xs_BD.shape[1])
    elif arch == "relu":
        z_BF = acts_BF
        sparsity = (
            cfg["l1_coeff"] * (z_BF * params["W_dec"].norm(dim=-1)).sum(-1).mean() / xs_BD.shape[1]
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    x_hat_BD = decode(z_BF, params["W_dec"], params["b_dec"])
    if arch == "matryoshka":  # every prefix of groups must reconstruct on its own; equal weights
        ends = torch.tensor(cfg["group_sizes"]).cumsum(0).tolist()
        mse = sum(
            F.mse_loss(decode(z_BF[:, :e], params["W_dec"][:e], params["b_dec"]), xs_BD)
            for e in ends
        )
        mse = mse / len(ends)
    else:
        mse = F.mse_loss(x_hat_BD, xs_BD)
    total = mse + sparsity
    if arch in ("batchtopk", "topk", "matryoshka") and dead_F is not None and bool(dead_F.any()):
        total = total + cfg["aux_alpha"] * auxk(
            acts_BF, dead_F, cfg["k_aux"], params["W_dec"], xs_BD - x_hat_BD
        )
    return total, z_BF, xs_BD, x_hat_BD, cut


def train_step(
    params: dict, opt: torch.optim.Optimizer, x_BD, cfg: dict, state: dict
) -> torch.Tensor:
    """One optimiser step: loss, backward, the decoder's gradient made orthogonal to its unit-norm
    rows, gradient clipping, Adam, rows back to unit norm; then the dead-latent counters and
    BatchTopK's theta.
    state: tokens_since_fired [F], theta, n_theta (updated in place). Returns the loss."""
    dead_F = state["tokens_since_fired"] >= cfg["dead_tokens"]
    total, z_BF, _, _, cut = loss(params, x_BD, cfg, dead_F)
    opt.zero_grad()
    total.backward()
    with torch.no_grad():
        W, g = params["W_dec"], params["W_dec"].grad
        g -= (g * W).sum(-1, keepdim=True) / (W * W).sum(-1, keepdim=True) * W
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg["grad_clip"])
        opt.step()
        W /= W.norm(dim=-1, keepdim=True)
        fired_F = (z_BF != 0).any(0)
        state["tokens_since_fired"] = (state["tokens_since_fired"] + x_BD.shape[0]).masked_fill(
            fired_F, 0
        )
        if cut is not None:
            state["theta"] = update_theta(
                state["theta"], state["n_theta"], float(cut), cfg["threshold_beta"]
            )
            state["n_theta"] += 1
    return total.detach()
