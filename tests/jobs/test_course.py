"""The notebook course's shared run: the SAE is trained once into the shared folder and reused, an
SAE chosen by folder is explored at its own model and hook, and a pretrained release offline says
what to do instead."""

import pytest
import torch

from saekit.jobs import course
from saekit.sae import load_sae
from saekit.sae.config import SAEConfigError


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(
        course.SIZES,
        "tiny",
        course.Sizes(train_tokens=1500, held_out_tokens=600, epochs=1, k=8, expansion=1, batch=256),
    )
    return "tiny"


def test_course_sae_is_trained_once_and_reused(tiny, tmp_path, monkeypatch):
    sae, m, store, held = course.course_sae(None, tmp_path, tiny, hook="resid_post.2")
    assert m.tokenizer is not None
    folders = list((tmp_path / "train").glob("batchtopk_*"))
    assert len(folders) == 1 and sae.cfg.k == 8 and sae.cfg.d_sae == store.d_model
    assert len(store) >= 1500 and len(held) >= 600 and (tmp_path / "store_train").exists()
    saved = load_sae(folders[0])
    calls, real = [], course.train
    monkeypatch.setattr(course, "train", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    # 04/05 after 02: reused
    again, _, _, _ = course.course_sae(None, tmp_path, tiny, hook="resid_post.2")
    assert calls == [1]
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):  # the saved SAE, not a new one
        assert torch.equal(getattr(again, name), getattr(saved, name)), name
    assert sorted(
        p.name for p in (tmp_path / "train").iterdir() if p.is_dir() and p.name != "checkpoints"
    ) == [folders[0].name]

    # an SAE chosen by its folder: explored as it is, at its own hook, with stores in a
    # folder of their own
    chosen, _, cstore, _ = course.course_sae(str(folders[0]), tmp_path, tiny, hook="resid_post.15")
    assert chosen.cfg.hook_name == "resid_post.2" and cstore.hook == "resid_post.2"
    assert course.run_dir_for(tmp_path, str(folders[0])) in cstore.path.parents
    topk = course.topk_companion(store, "resid_post.2", tmp_path, tiny)
    assert topk.cfg.arch == "topk" and topk.cfg.d_sae == sae.cfg.d_sae and topk.cfg.k == 8


def test_choices_that_cannot_load_say_why():
    assert course.load_choice(None) is None
    with pytest.raises(SAEConfigError, match="no SAE folder at"):
        course.load_choice("./no/such/folder")
    with pytest.raises(SAEConfigError, match="hub is not reachable|has no pretrained SAE"):
        course.load_choice("gpt2-small-res-jb/blocks.8.hook_resid_pre")
    with pytest.raises(ValueError, match="MODE must be one of"):
        course.sizes("huge")
    assert course.model_and_hook(None, None, "resid_post.15") == (None, "resid_post.15")
