"""Shared fixtures: the embedded model (loaded once), small packed corpora and a small store."""

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

# tests in subfolders (tests/sae/, ...) import the shared helpers here (conftest,
# readbacks, bad_input)
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here or in CI: make that explicit and fast
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*non-writable.*")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# an early layer keeps captures fast; the stop-after-layer path is what is tested
HOOK = "resid_post.6"


@pytest.fixture(scope="session")
def model():
    from saekit.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="session")
def packed(tokenizer):
    from saekit.data import packed_corpus

    return packed_corpus(tokenizer, split="train", seq_len=64, max_tokens=3000)


@pytest.fixture(scope="session")
def store(model, packed, tmp_path_factory):
    from saekit.activations import capture

    out = tmp_path_factory.mktemp("store")
    return capture(
        model,
        packed,
        [HOOK, "mlp_out.3"],
        out,
        n_tokens=2000,
        batch_size=8,
        dtype="float32",
        shard_tokens=640,
        progress=False,
    )


def split_sae(arch="relu", d=576, threshold=None, k=None):
    """Latent j < d reads +x_j, latent d + j reads -x_j: with threshold t a token's count is #{j:
    |x_j| > t}."""
    kw = dict(k=k) if k else {}
    from saekit.sae import make_sae

    sae = make_sae(arch=arch, d_in=d, d_sae=2 * d, normalize="none", hook_name=HOOK, **kw)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if threshold is not None:
            sae.threshold.fill_(threshold)
            sae.threshold_updates.fill_(1)
    return sae.eval()


@pytest.fixture
def sparse_everywhere(monkeypatch):
    """The sparse path at the tests' small sizes too (saekit picks the dense one below
    SPARSE_MIN_LATENTS)."""
    import saekit.sae.fast.paths as paths

    monkeypatch.setattr(paths, "SPARSE_MIN_LATENTS", 0)
    monkeypatch.setattr(paths, "SPARSE_MAX_DENSITY", 1.0)


from bad_input import copy  # noqa: E402  (found through the path set above)


# the bad-input suites' SAE and copies of it and of the store, which a case may damage
@pytest.fixture(scope="module")
def sae_dir(store, tmp_path_factory):
    """A BatchTopK SAE trained at the shared store's HOOK, recording its model and hook."""
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig, train

    cfg = SAEConfig(
        arch="batchtopk",
        d_in=576,
        d_sae=1152,
        k=8,
        hook_name=HOOK,
        model_name=store.manifest["model"],
    )
    res = train(
        store,
        cfg,
        TrainConfig(total_tokens=2048, batch_size=256, warmup_steps=2, progress=False),
        out=tmp_path_factory.mktemp("bad_sae"),
    )
    return res.out / res.names[0]


@pytest.fixture
def my_store(store, tmp_path):
    return copy(store.path, tmp_path / "store")


@pytest.fixture
def my_sae(sae_dir, tmp_path):
    return copy(sae_dir, tmp_path / "sae")
