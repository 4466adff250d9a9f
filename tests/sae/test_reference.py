"""saekit's SAEs against the plain reference (saekit/sae/reference.py): the same loss and every
gradient on the fast (sparse) path, and 20 training steps from the same start to the same
weights."""

import math

import pytest
import torch

from saekit.sae import SAEConfig, make_sae
from saekit.sae import reference as ref
from saekit.train import TrainConfig
from saekit.train.trainer import Trainer

ARCHS = ["batchtopk", "topk", "matryoshka", "jumprelu", "relu"]
D, F_, B = 32, 256, 128
# 20 steps of fp32 Adam, fused (saekit) against plain (reference)
STEP_TOLERANCE = dict(atol=2e-5, rtol=1e-4)


def _cfg(arch: str, normalize: str = "token") -> SAEConfig:
    return SAEConfig(
        arch=arch,
        d_in=D,
        d_sae=F_,
        k=4,
        k_aux=32,
        dead_tokens=2 * B,
        normalize=normalize,
        target_l0=4.0 if arch == "jumprelu" else None,
        l1_coeff=1.0,
    )


def _ref_cfg(sae) -> dict:
    c = sae.cfg
    return {
        "arch": c.arch,
        "k": c.k,
        "k_aux": c.k_aux,
        "aux_alpha": c.aux_alpha,
        "normalize": c.normalize,
        "l1_coeff": c.l1_coeff,
        "l0_coeff": c.l0_coeff,
        "target_l0": c.target_l0,
        "bandwidth": c.jumprelu_bandwidth,
        "group_sizes": c.group_sizes,
        "dead_tokens": c.dead_tokens,
        "threshold_beta": c.threshold_beta,
        "grad_clip": 1.0,
    }


def _ref_params(sae) -> dict:
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (
        ["log_threshold"] if sae.cfg.arch == "jumprelu" else []
    )
    return {n: getattr(sae, n).detach().clone().requires_grad_(True) for n in names}


def _grads(sae) -> dict:
    out = {n: getattr(sae, n).grad for n in ("b_enc", "W_dec", "b_dec")}
    out["W_enc"] = sae.W_enc_t.grad.t()
    if sae.cfg.arch == "jumprelu":
        out["log_threshold"] = sae.log_threshold.grad
    return out


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, D, generator=g) + 0.1 * torch.randn(
        n, D, generator=g
    )


def _start(sae) -> None:
    with torch.no_grad():
        sae.b_dec.copy_(_data(B, 9).mean(0) * 0.1)
        if sae.cfg.arch == "jumprelu":
            sae.log_threshold.fill_(math.log(0.3))


@pytest.mark.parametrize("normalize", ["token", "none"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_fast_path_gives_the_reference_loss_and_every_gradient(
    arch, normalize, sparse_everywhere
):
    torch.manual_seed(0)
    sae = make_sae(_cfg(arch, normalize))
    _start(sae)
    dead = torch.zeros(F_, dtype=torch.bool)
    dead[:40] = True
    # dead latents: AuxK works (for the architectures that use it)
    sae.tokens_since_fired[dead] = 10 * B
    x = _data(B, 1)
    out = sae.training_loss(x, fast=True)
    assert out.path == "sparse"
    out.loss.backward()
    params = _ref_params(sae)
    loss, z, _, _, cut = ref.loss(params, x, _ref_cfg(sae), dead)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-6, rtol=1e-5)
    assert (float(out.terms["aux"]) > 0) == sae.uses_auxk
    if cut is not None:
        torch.testing.assert_close(out.cut, cut)
    ours = _grads(sae)
    for name, p in params.items():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_twenty_training_steps_reach_the_reference_weights(arch, sparse_everywhere):
    torch.manual_seed(0)
    tc = TrainConfig(
        total_tokens=20 * B,
        batch_size=B,
        lr=1e-3,
        warmup_steps=0,
        decay_frac=0.0,
        calibrate_batches=0,
        device="cpu",
        autocast=False,
        progress=False,
        checkpoint_every=0,
        log_every=1,
    )
    trainer = Trainer([_cfg(arch)], tc)
    sae = trainer.saes[0]
    _start(sae)
    params, cfg = _ref_params(sae), _ref_cfg(sae)
    groups = [{"params": [params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")], "lr": tc.lr}]
    if arch == "jumprelu":
        groups.append(
            {"params": [params["log_threshold"]], "lr": tc.lr * sae.cfg.threshold_lr_scale}
        )
    opt = torch.optim.Adam(groups, betas=tc.betas)
    state = {"tokens_since_fired": torch.zeros(F_, dtype=torch.long), "theta": 0.0, "n_theta": 0}
    for step in range(20):
        x = _data(B, 100 + step)
        trainer.train_step(x)
        ref.train_step(params, opt, x, cfg, state)
    for name, p in params.items():
        torch.testing.assert_close(
            getattr(sae, name).detach(), p.detach(), **STEP_TOLERANCE, msg=name
        )
    assert torch.equal(sae.tokens_since_fired, state["tokens_since_fired"])
    if sae.uses_auxk:  # latents died along the way, so AuxK's part was compared too
        assert max(row["aux"] for row in trainer.logs[0]) > 0
    if sae.has_theta:
        assert float(sae.threshold) == pytest.approx(state["theta"], rel=1e-4)
        assert int(sae.threshold_updates) == state["n_theta"] == 20


def test_inference_by_threshold_does_not_depend_on_the_batch():
    acts = torch.relu(torch.randn(16, 64))
    theta = ref.estimate_theta([acts[:8], acts[8:]], k=4)
    alone = ref.threshold_code(acts[:1], theta)
    assert torch.equal(alone, ref.threshold_code(acts, theta)[:1])
    z, cut = ref.batch_topk(acts, 4)
    assert int((z != 0).sum()) == 16 * 4 and float(cut) == float(z[z != 0].min())
    assert (ref.topk(acts, 4) != 0).sum(-1).tolist() == [4] * 16
    assert ref.update_theta(0.0, 0, 2.0) == 2.0 and ref.update_theta(2.0, 1, 4.0) == 3.0


def test_the_reference_stands_alone_and_short():
    import ast
    from pathlib import Path

    source = Path(ref.__file__).read_text()
    imported = {
        a.name.split(".")[0]
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Import)
        for a in n.names
    }
    imported |= {
        n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)
    }
    assert imported == {"torch"} and len(source.splitlines()) <= 200
