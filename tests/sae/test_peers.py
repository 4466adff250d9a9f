"""Interop with the real peer packages (the `peers` extra): SAELens reads what saekit saves, saekit
reads what SAELens and sparsify save, and each side gives the other's code and reconstruction."""

import json

import pytest
import torch
from sae_lens import (
    SAE as SLSAE,
)
from sae_lens import (
    BatchTopKTrainingSAEConfig,
    JumpReLUSAEConfig,
    JumpReLUTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardSAEConfig,
    TopKSAEConfig,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sparsify import SparseCoder, SparseCoderConfig

import saekit
from saekit.interop import from_saelens_sae, from_sparsify_coder, to_saelens
from saekit.sae import (
    ARCHS,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    SAEConfigError,
    TopKSAE,
    load_sae,
    make_sae,
)

D, F, K = 16, 64, 4
SAELENS_CLASS = {
    "batchtopk": "JumpReLUSAE",
    "matryoshka": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "topk": "TopKSAE",
    "relu": "StandardSAE",
}


def _inputs(seed=1, n=200):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * torch.rand(n, 1, generator=g) * 4 + 0.5


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _saekit_out(sae, x):
    mode = "threshold" if isinstance(sae, BatchTopKSAE) else None
    out = sae(x, mode=mode)
    return out.z, out.x_hat


def _same_outputs(sae, sl):
    """saekit's (threshold-mode) code and reconstruction equal SAELens's encode/decode; a real
    sparse code."""
    x = _inputs()
    z, x_hat = _saekit_out(sae, x)
    with torch.no_grad():
        z_sl = sl.encode(x)
        _close(z, z_sl)
        _close(x_hat, sl.decode(z_sl))
    assert (z != 0).any() and (z == 0).any()
    return x, x_hat


def _randomise(module, seed=0):
    """Weights with varied decoder norms and non-zero biases, so every fold is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("W_enc", "W_enc_t", "W_dec", "encoder.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("b_enc") or name == "encoder.bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name == "b_dec":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name in ("threshold", "log_threshold"):
                t = torch.rand(p.shape, generator=g) * 0.4 + 0.05
                p.copy_(t.log() if name == "log_threshold" else t)
        if hasattr(module, "W_dec") and module.W_dec.shape == (F, D):
            module.W_dec.mul_(torch.rand(F, 1, generator=g) + 0.5)


# -- saekit -> SAELens -----------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["none", "token", "dataset"])
@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_saekit_folders_and_gives_the_same_code(arch, normalize, tmp_path):
    torch.manual_seed(0)
    sae = make_sae(
        arch=arch,
        d_in=D,
        d_sae=F,
        k=K,
        normalize=normalize,
        target_l0=K if arch == "jumprelu" else None,
    )
    _randomise(sae)
    with torch.no_grad():
        sae.input_scale.fill_(0.37)  # a dataset-wide scale that must be folded into the files
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.3)
            sae.threshold_updates.fill_(1)
    sae.eval().save(tmp_path)
    sl = SLSAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(sl).__name__ == SAELENS_CLASS[arch]
    x, _ = _same_outputs(sae, sl)
    z = _saekit_out(sae, x)[0]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (
        cfg["metadata"]["training_architecture"]
        == {
            "batchtopk": "batchtopk",
            "matryoshka": "matryoshka_batchtopk",
            "topk": "topk",
            "jumprelu": "jumprelu",
            "relu": "standard",
        }[arch]
    )
    if arch == "matryoshka":
        assert cfg["metadata"]["training_architecture_details"]["matryoshka_widths"][-1] == F
    # the live-object helper goes through the same files
    with torch.no_grad():
        _close(to_saelens(sae).encode(x), z)


# -- SAELens -> saekit -----------------------------------------------------------------------------

INFERENCE = {
    "standard": (StandardSAEConfig, {}, ReLUSAE),
    "topk": (TopKSAEConfig, {"k": K}, TopKSAE),
    "topk_rescaled": (TopKSAEConfig, {"k": K, "rescale_acts_by_decoder_norm": True}, TopKSAE),
    "jumprelu": (JumpReLUSAEConfig, {}, JumpReLUSAE),
}


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("norm", ["none", "layer_norm"])
@pytest.mark.parametrize("kind", list(INFERENCE))
def test_saekit_loads_saelens_inference_saes(kind, norm, apply_b_dec, tmp_path):
    cls, extra, ours = INFERENCE[kind]
    sl = SLSAE.from_dict(
        cls(
            d_in=D, d_sae=F, normalize_activations=norm, apply_b_dec_to_input=apply_b_dec, **extra
        ).to_dict()
    )
    _randomise(sl)
    sl.save_model(str(tmp_path))
    sae = load_sae(tmp_path)
    assert type(sae) is ours and sae.cfg.normalize == ("token" if norm == "layer_norm" else "none")
    _same_outputs(sae, sl)


TRAINING = {
    "batchtopk": (BatchTopKTrainingSAEConfig, {"k": K}, BatchTopKSAE),
    "matryoshka_batchtopk": (
        MatryoshkaBatchTopKTrainingSAEConfig,
        {"k": K, "matryoshka_widths": [8, 24, F]},
        MatryoshkaSAE,
    ),
    "topk": (TopKTrainingSAEConfig, {"k": K}, TopKSAE),
    "jumprelu": (JumpReLUTrainingSAEConfig, {}, JumpReLUSAE),
}


@pytest.mark.parametrize("layout", ["inference", "training"])
@pytest.mark.parametrize("kind", list(TRAINING))
def test_saekit_loads_saelens_training_saes(kind, layout, tmp_path):
    """SAELens training SAEs, saved by SAELens both ways (save_inference_model / save_model)."""
    cls, extra, ours = TRAINING[kind]
    tr = TrainingSAE.from_dict(
        cls(d_in=D, d_sae=F, normalize_activations="layer_norm", **extra).to_dict()
    )
    _randomise(tr)
    if hasattr(tr, "topk_threshold"):
        tr.topk_threshold.fill_(0.25)
    ref_dir = tmp_path / "inference"
    tr.save_inference_model(str(ref_dir))
    ref = SLSAE.load_from_disk(str(ref_dir), device="cpu")  # what SAELens itself runs at inference
    if layout == "training":
        tr.save_model(str(tmp_path / "training"))
        sae = load_sae(tmp_path / "training")
    else:
        sae = load_sae(ref_dir)
    assert type(sae) is ours
    if ours in (BatchTopKSAE, MatryoshkaSAE):
        assert sae.cfg.k == K and abs(float(sae.threshold) - 0.25) < 1e-6
    if ours is MatryoshkaSAE:
        assert sae.widths == [8, 24, F]
    x, x_hat = _same_outputs(sae, ref)
    # the live-object helper gives the same SAE
    _close(_saekit_out(from_saelens_sae(tr), x)[1], x_hat)


def test_saelens_errors_name_the_unsupported_setting(tmp_path):
    sl = SLSAE.from_dict(
        StandardSAEConfig(
            d_in=D, d_sae=F, normalize_activations="expected_average_only_in"
        ).to_dict()
    )
    sl.save_model(str(tmp_path))
    with pytest.raises(SAEConfigError, match="normalize_activations='expected_average_only_in'"):
        load_sae(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "gated"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path)


# -- sparsify -> saekit ----------------------------------------------------------------------------


def test_saekit_loads_sparsify_checkpoints_as_topk(tmp_path):
    torch.manual_seed(0)
    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K), device="cpu")
    _randomise(coder)
    coder.save_to_disk(tmp_path)
    assert (tmp_path / "sae.safetensors").exists()
    sae = load_sae(tmp_path)
    assert type(sae) is TopKSAE and sae.cfg.k == K and sae.cfg.normalize == "none"
    x = _inputs()
    z, x_hat = _saekit_out(sae, x)
    with torch.no_grad():
        enc = coder.encode(x)
        dense = torch.zeros(len(x), F).scatter(-1, enc.top_indices, enc.top_acts)
        _close(z, dense)
        _close(x_hat, coder.decode(enc.top_acts, enc.top_indices))
    assert ((z != 0).sum(-1) == K).all()
    _close(_saekit_out(from_sparsify_coder(coder), x)[1], x_hat)


@pytest.mark.parametrize("normalize", ["none", "dataset"])
def test_sparsify_loads_saekit_topk_saes(tmp_path, normalize):
    """saekit -> sparsify: the files save_sparsify writes load in sparsify with the same code and
    reconstruction."""
    from saekit.interop import to_sparsify_coder
    from saekit.sae import save_sparsify

    torch.manual_seed(0)
    sae = make_sae(arch="topk", d_in=D, d_sae=F, k=K, normalize=normalize)
    _randomise(sae)
    with torch.no_grad():
        # folded into the weights for normalize="dataset", unused otherwise
        sae.input_scale.fill_(0.37)
    save_sparsify(sae, tmp_path)
    coder = SparseCoder.load_from_disk(tmp_path)
    x = _inputs()
    z, x_hat = _saekit_out(sae, x)
    with torch.no_grad():
        enc = coder.encode(x)
        _close(z, torch.zeros(len(x), F).scatter(-1, enc.top_indices, enc.top_acts))
        _close(x_hat, coder.decode(enc.top_acts, enc.top_indices))
    assert coder.cfg.k == K and coder.num_latents == F
    _close(_saekit_out(from_sparsify_coder(to_sparsify_coder(sae)), x)[1], x_hat)


def test_sparsify_export_refuses_what_sparsify_cannot_express(tmp_path):
    from saekit.sae import save_sparsify

    with pytest.raises(SAEConfigError, match="exactly k latents per token"):
        save_sparsify(make_sae(arch="batchtopk", d_in=D, d_sae=F, k=K), tmp_path)
    with pytest.raises(SAEConfigError, match="no per-token input normalisation"):
        save_sparsify(make_sae(arch="topk", d_in=D, d_sae=F, k=K, normalize="token"), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_sparsify_transcoders_get_a_clear_error(tmp_path):
    coder = SparseCoder(
        D, SparseCoderConfig(num_latents=F, k=K, skip_connection=True), device="cpu"
    )
    coder.save_to_disk(tmp_path)
    with pytest.raises(SAEConfigError, match="skip connection"):
        load_sae(tmp_path)


# -- pretrained releases ---------------------------------------------------------------------------


def test_load_pretrained_offline_says_the_hub_is_unreachable():
    # conftest sets HF_HUB_OFFLINE=1: no hub here or in CI
    with pytest.raises(SAEConfigError, match="hub is not reachable"):
        saekit.load("gpt2-small-res-jb/blocks.8.hook_resid_pre")


def test_load_names_what_it_could_not_find(tmp_path):
    with pytest.raises(SAEConfigError, match="has no pretrained SAE"):
        saekit.load("gpt2-small-res-jb", "blocks.99.no_such_hook")
    with pytest.raises(SAEConfigError, match="neither an SAE folder nor 'release/sae_id'"):
        saekit.load("no_such_folder_or_release")
    sae = make_sae(arch="topk", d_in=D, d_sae=F, k=K)
    sae.save(tmp_path / "mine")
    assert type(saekit.load(tmp_path / "mine")) is TopKSAE  # a local folder loads directly


def test_saelens_loads_a_calibrated_folder_and_gives_saekits_code(tmp_path):
    from saekit.calibrate import calibrate_folder
    from saekit.train import TensorSource

    torch.manual_seed(0)
    sae = make_sae(arch="batchtopk", d_in=D, d_sae=F, k=K, normalize="token")
    _randomise(sae)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
        sae.threshold_updates.fill_(1)
    sae.eval().save(tmp_path / "sae")

    class Store(TensorSource):  # the little a calibration reads of a store
        path, manifest, hooks, hook = tmp_path / "store", {"model": "toy"}, ["h"], "h"

        def rows(self, s, e, hook=None):
            return self.x[s:e]

        def head_batches(self, n, batch_size, hook=None):
            return (self.x[s : min(s + batch_size, n)] for s in range(0, n, batch_size))

    rec = calibrate_folder(tmp_path / "sae", Store(_inputs(seed=2, n=500)), target_l0=3)
    assert rec["l0_after"] == pytest.approx(3, rel=0.01) and rec["theta"] != pytest.approx(0.3)
    cal = load_sae(tmp_path / "sae")
    assert cal.theta_info["source"] == "calibrated" and cal.theta_info["target_l0"] == 3
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["saekit"]["theta"][
        "store"
    ] == str(tmp_path / "store")
    _same_outputs(cal, SLSAE.load_from_disk(str(tmp_path / "sae")))
