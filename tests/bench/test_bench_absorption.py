"""Absorption, truth first: on a parent/child hierarchy whose features are known, an SAE built by
hand so that one child's latent absorbs its parent scores as absorbed, and a clean SAE over the same
data does not; then the first-letter task on the embedded model."""

import numpy as np
import pytest
import torch

from saekit.bench.absorption import AbsorptionConfig, absorption_eval, word_absorption
from saekit.bench.letters import LETTERS
from saekit.bench.toy import absorption_toy

N_PARENTS = 4


def test_a_hand_built_absorbing_latent_is_found_and_a_clean_sae_scores_zero():
    toy = absorption_toy(n_parents=N_PARENTS)
    data, child, absorbing = toy.data, toy.child, toy.absorbing_latent
    cfg = AbsorptionConfig(min_GT_probe_f1=0.6, k_sparse_probe_num_epochs=30)
    out = {
        name: absorption_eval(toy.saes[sae], data, cfg, progress=False)
        for name, sae in (("clean", "clean"), ("absorbed", "absorbing"))
    }
    letter0 = {n: o["eval_result_unstructured"]["letters"][0] for n, o in out.items()}
    assert all(v["first_letter"] == "a" and v["probe_f1"] > 0.95 for v in letter0.values())
    assert letter0["clean"]["main_latents"] == [0] == letter0["absorbed"]["main_latents"]

    test_rows = np.nonzero(~data.train)[0]
    absorbed_words = {f"w{i}" for i in test_rows if child[i] == absorbing}
    assert len(absorbed_words) >= 5
    for name, o in out.items():
        words = [w for w in o["eval_result_unstructured"]["words"] if w["letter"] == "a"]
        hit = [w for w in words if w["word"] in absorbed_words]
        rest = [w for w in words if w["word"] not in absorbed_words]
        assert len(hit) == len(absorbed_words)  # the probe finds every one of them
        if name == "absorbed":  # fully absorbed, by the child's latent, and nothing else is
            assert all(w["absorption_fraction"] == 1.0 and w["is_full_absorption"] for w in hit)
            assert all(w["top_latent"] == absorbing for w in hit)
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
