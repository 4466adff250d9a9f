"""Absorption, truth first: on a parent/child hierarchy whose features are known, an SAE built by
hand so that one child's latent absorbs its parent scores as absorbed, and a clean SAE over the same
data does not; then the first-letter task on the embedded model."""

import numpy as np
import pytest
import torch

from saekit.bench.absorption import AbsorptionConfig, absorption_eval, word_absorption
from saekit.bench.letters import LETTERS, LetterData
from saekit.sae import make_sae

N_PARENTS, CHILDREN, D = 4, 3, 32
ABSORBED = N_PARENTS  # the first child of parent 0 absorbs parent 0


def _hierarchy(n=6000, seed=0):
    """Samples with exactly one active parent (the "letter"), which has a child in 30% of them;
    parent 0's first child is rarer (3%), so that its latent is not needed to find letter 0.
    Orthonormal feature directions: no two features interfere."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T[: N_PARENTS * (1 + CHILDREN)]
    parent = torch.randint(0, N_PARENTS, (n,), generator=g)
    child = torch.randint(0, CHILDREN, (n,), generator=g)
    p_child = torch.where((parent == 0) & (child == 0), 0.03 * CHILDREN, 0.3)
    has_child = torch.rand(n, generator=g) < p_child
    coeff = 0.5 + torch.rand(n, 2, generator=g)
    x = coeff[:, :1] * feats[parent]
    child_feature = N_PARENTS + parent * CHILDREN + child
    x += (has_child * 0.6 * coeff[:, 1])[:, None] * feats[child_feature]
    x += 0.01 * torch.randn(n, D, generator=g)
    child_feature = torch.where(has_child, child_feature, -1)
    return feats, x, parent.numpy(), child_feature.numpy()


def _sae(feats, absorbed: bool):
    """One ReLU latent per feature, reading and writing its own direction; `absorbed`: the
    absorbing child's latent also writes its parent's direction, and the parent's latent is shut
    off whenever that child is present."""
    enc, dec = feats.clone(), feats.clone()
    if absorbed:
        parent, child = feats[0], feats[ABSORBED]
        enc[0] = parent - 10 * child
        enc[ABSORBED] = 4 * child  # fires with the child only, and strongly enough to stand in
        dec[ABSORBED] = (child + parent) / 2**0.5
    sae = make_sae(arch="relu", d_in=D, d_sae=len(feats), normalize="none", l1_coeff=1e-3)
    sae.set_weights(
        {"W_enc": enc.T, "W_dec": dec, "b_enc": torch.zeros(len(feats)), "b_dec": torch.zeros(D)}
    )
    return sae.eval()


def _letters(x, parent, seed=0):
    rng = np.random.default_rng(seed)
    train = rng.random(len(x)) < 0.8
    words = [f"w{i}" for i in range(len(x))]
    return LetterData(words=words, letters=parent, train=train, x=x, skipped={})


def test_a_hand_built_absorbing_latent_is_found_and_a_clean_sae_scores_zero():
    feats, x, parent, child = _hierarchy()
    data = _letters(x, parent)
    cfg = AbsorptionConfig(min_GT_probe_f1=0.6, k_sparse_probe_num_epochs=30)
    out = {
        name: absorption_eval(_sae(feats, absorbed=name == "absorbed"), data, cfg, progress=False)
        for name in ("clean", "absorbed")
    }
    letter0 = {n: o["eval_result_unstructured"]["letters"][0] for n, o in out.items()}
    assert all(v["first_letter"] == "a" and v["probe_f1"] > 0.95 for v in letter0.values())
    assert letter0["clean"]["main_latents"] == [0] == letter0["absorbed"]["main_latents"]

    test_rows = np.nonzero(~data.train)[0]
    absorbed_words = {f"w{i}" for i in test_rows if child[i] == ABSORBED}
    assert len(absorbed_words) >= 5
    for name, o in out.items():
        words = [w for w in o["eval_result_unstructured"]["words"] if w["letter"] == "a"]
        hit = [w for w in words if w["word"] in absorbed_words]
        rest = [w for w in words if w["word"] not in absorbed_words]
        assert len(hit) == len(absorbed_words)  # the probe finds every one of them
        if name == "absorbed":  # fully absorbed, by the child's latent, and nothing else is
            assert all(w["absorption_fraction"] == 1.0 and w["is_full_absorption"] for w in hit)
            assert all(w["top_latent"] == ABSORBED for w in hit)
        else:  # the parent's latent fires on them: at most noise along the probe is unaccounted
            assert not any(w["absorption_fraction"] > 0.1 or w["is_full_absorption"] for w in hit)
        assert not any(w["absorption_fraction"] > 0.1 or w["is_full_absorption"] for w in rest)
    details = {n: {d["first_letter"]: d for d in o["eval_result_details"]} for n, o in out.items()}
    share = len(absorbed_words) / details["absorbed"]["a"]["num_probe_true_positives"]
    assert details["absorbed"]["a"]["full_absorption_rate"] == pytest.approx(share)
    assert details["clean"]["a"]["full_absorption_rate"] == 0.0
    assert details["absorbed"]["a"]["mean_absorption_fraction"] > share * 0.9
    assert details["clean"]["a"]["mean_absorption_fraction"] < share * 0.2
    for letter in LETTERS[1:N_PARENTS]:  # the other letters are the same SAE in both
        assert details["absorbed"][letter] == details["clean"][letter]


def test_one_word_scores_as_saebench_defines_them():
    probe = torch.tensor([1.0, 0.0, 0.0])
    cos = torch.tensor([1.0, 0.8, 0.05, -0.5])
    x = torch.tensor([2.0, 0.0, 1.0])
    # the main latent carries the whole projection: nothing absorbed
    z = torch.tensor([2.0, 0.0, 0.0, 0.0])
    assert word_absorption(x, z, probe, cos, [0])["absorption_fraction"] == 0.0
    # half on the main latent, the rest on an aligned latent: a fraction, not full absorption
    z = torch.tensor([1.0, 1.25, 0.0, 0.0])
    scored = word_absorption(x, z, probe, cos, [0])
    assert scored["absorption_fraction"] == pytest.approx(0.5)
    assert not scored["is_full_absorption"]
    # the main latent silent, an aligned latent carrying it all: full absorption by latent 1
    z = torch.tensor([0.0, 2.5, 0.0, 0.0])
    assert word_absorption(x, z, probe, cos, [0]) == {
        "absorption_fraction": 1.0,
        "is_full_absorption": True,
        "top_latent": 1,
    }
    # a latent barely aligned with the probe (cosine under 0.1) does not count as an absorber
    z = torch.tensor([0.0, 0.0, 40.0, 0.0])
    assert word_absorption(x, z, probe, cos, [0])["absorption_fraction"] == 0.0
