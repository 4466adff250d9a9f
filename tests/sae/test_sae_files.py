import json

import pytest
import torch

from saekit.sae import (
    ARCHS,
    BatchTopKSAE,
    SAEConfig,
    SAEConfigError,
    load_sae,
    make_sae,
)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("normalize", ["none", "token", "dataset"])
def test_save_load_round_trip(arch, normalize, tmp_path):
    torch.manual_seed(0)
    cfg = SAEConfig(
        arch=arch,
        d_in=16,
        d_sae=64,
        k=4,
        normalize=normalize,
        hook_name="resid_post.3",
        model_name="m",
        target_l0=4 if arch == "jumprelu" else None,
    )
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.input_scale.fill_(0.37)
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.05)
            sae.threshold_updates.fill_(10)
    sae.eval()
    x = torch.randn(20, 16) * 3
    z1, xh1 = sae(x)
    sae.save(tmp_path / "s")
    cfg_json = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg_json["metadata"]["hook_name"] == "resid_post.3" and cfg_json["d_sae"] == 64
    expected = {
        "batchtopk": "jumprelu",
        "jumprelu": "jumprelu",
        "topk": "topk",
        "relu": "standard",
        "matryoshka": "jumprelu",
    }[arch]
    assert cfg_json["architecture"] == expected
    loaded = load_sae(tmp_path / "s")
    assert type(loaded) is type(sae)
    z2, xh2 = loaded(x)
    torch.testing.assert_close(xh1, xh2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)


def test_loads_saelens_style_folder(tmp_path):
    """A folder laid out as SAELens writes it (jumprelu with a per-latent threshold)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d, f = 12, 40
    w = {
        "W_enc": torch.randn(d, f),
        "W_dec": torch.randn(f, d),
        "b_enc": torch.randn(f) * 0.1,
        "b_dec": torch.randn(d) * 0.1,
        "threshold": torch.rand(f) * 0.5,
    }
    (tmp_path / "x").mkdir()
    save_file(w, str(tmp_path / "x" / "sae_weights.safetensors"))
    (tmp_path / "x" / "cfg.json").write_text(
        json.dumps(
            {
                "architecture": "jumprelu",
                "d_in": d,
                "d_sae": f,
                "normalize_activations": "none",
                "metadata": {"hook_name": "blocks.3.hook_resid_post"},
            }
        )
    )
    sae = load_sae(tmp_path / "x")
    x = torch.randn(7, d)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z_ref = torch.relu(pre) * (pre > w["threshold"])
    torch.testing.assert_close(sae.encode(x), z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x).x_hat, z_ref @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"


def test_bad_sae_inputs_and_files(tmp_path):
    with pytest.raises(SAEConfigError, match="k must satisfy"):
        SAEConfig(arch="batchtopk", d_in=8, d_sae=16, k=16)
    with pytest.raises(SAEConfigError, match="unknown architecture"):
        SAEConfig(arch="gated")
    sae = make_sae(arch="topk", d_in=8, d_sae=32, k=2)
    with pytest.raises(SAEConfigError, match="d_in=8"):
        sae.encode(torch.randn(3, 9))
    with pytest.raises(SAEConfigError, match="floating point"):
        sae.encode(torch.ones(3, 8, dtype=torch.long))
    sae.save(tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEConfigError, match="corrupt"):
        load_sae(tmp_path / "s")
    with pytest.raises(SAEConfigError, match="not an SAE folder"):
        load_sae(tmp_path / "nothing")
