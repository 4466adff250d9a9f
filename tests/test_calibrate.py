"""Calibrating BatchTopK's inference threshold theta to a target L0 on a store of one's choice."""

import json

import pytest
import torch
from conftest import HOOK

from saekit.calibrate import calibrate, calibrate_folder
from saekit.metrics import per_token_l0
from saekit.plumbing.checks import DataMismatchError
from saekit.sae import SAEConfig, SAEConfigError, load_sae, make_sae
from saekit.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal")
    cfgs = [
        SAEConfig(arch="batchtopk", d_in=576, d_sae=1152, k=8, hook_name=HOOK),
        SAEConfig(arch="topk", d_in=576, d_sae=1152, k=8, hook_name=HOOK),
    ]
    train(
        store,
        cfgs,
        TrainConfig(total_tokens=6000, batch_size=256, warmup_steps=2, progress=False),
        out=out,
    )
    return out


def test_training_records_both_theta_estimates(trained):
    info = load_sae(trained / "batchtopk_k8_1152").theta_info
    assert (
        info["source"] == "training" and info["running_estimate"] > 0 and info["final_estimate"] > 0
    )
    assert info["final_estimate"] != info["running_estimate"]


@pytest.mark.parametrize("target", [8, 3.5, 20])
def test_calibration_hits_the_target_l0_on_its_store(trained, store, target):
    sae = load_sae(trained / "batchtopk_k8_1152")
    rec = calibrate(sae, store, target_l0=target)
    l0 = per_token_l0(sae, store).mean()
    assert l0 == pytest.approx(target, rel=0.01) and rec["l0_after"] == pytest.approx(l0)
    assert rec["n_tokens"] == len(store) and rec["previous"]["source"] == "training"
    # theta sits between the kept and the first dropped activation: a hair lower keeps
    # more, higher keeps fewer
    with torch.no_grad():
        sae.threshold.mul_(1.02)
    assert per_token_l0(sae, store).mean() < l0


def test_calibrating_on_one_half_holds_on_the_other(trained, store):
    sae = load_sae(trained / "batchtopk_k8_1152")
    calibrate(sae, store, n_tokens=len(store) // 2)
    l0 = per_token_l0(sae, store)
    half = len(store) // 2
    assert l0[:half].mean() == pytest.approx(8, rel=0.01) and l0[half:].mean() == pytest.approx(
        8, rel=0.25
    )


def test_calibrate_folder_and_cli_write_theta_and_its_source(trained, store, capsys):
    from saekit.cli import main

    folder = trained / "batchtopk_k8_1152"
    assert main(["calibrate", str(folder), "--store", str(store.path), "--target-l0", "6"]) == 0
    assert "-> " in capsys.readouterr().out
    cfg = json.loads((folder / "cfg.json").read_text())
    theta = cfg["saekit"]["theta"]
    assert (
        theta["source"] == "calibrated"
        and theta["target_l0"] == 6
        and theta["store"] == str(store.path)
    )
    assert theta["store_model"] == store.manifest["model"] and theta["n_tokens"] == len(store)
    assert per_token_l0(load_sae(folder), store).mean() == pytest.approx(6, rel=0.01)
    rec = calibrate_folder(folder, store)  # default target: k
    assert rec["target_l0"] == 8 and rec["previous"]["target_l0"] == 6


def test_calibration_refuses_what_it_cannot_do(trained, store):
    with pytest.raises(SAEConfigError, match="global threshold"):
        calibrate(load_sae(trained / "topk_k8_1152"), store)
    sae = load_sae(trained / "batchtopk_k8_1152")
    with pytest.raises(SAEConfigError, match="cannot be reached"):
        calibrate(sae, store, target_l0=1151)
    for target in (2000, float("inf"), float("nan"), 0):
        with pytest.raises(SAEConfigError, match="above 0 and below the 1,152 latents"):
            calibrate(sae, store, target_l0=target)
    with pytest.raises(DataMismatchError, match="d_in=64"):
        calibrate(make_sae(arch="batchtopk", d_in=64, d_sae=128, k=4, hook_name=HOOK), store)


def test_eval_reports_batch_and_threshold_mode_l0(trained, store):
    from saekit.metrics import evaluate

    m = evaluate(load_sae(trained / "batchtopk_k8_1152"), None, store, n_tokens=1000)
    sp = m["sparsity"]
    assert sp["l0_batch_mode"] == pytest.approx(8, rel=1e-6)
    assert sp["l0_threshold_mode"] == sp["l0"] and sp["l0_threshold_over_batch"] == pytest.approx(
        sp["l0"] / 8
    )
    assert m["sae"]["theta"] > 0 and m["sae"]["theta_info"]["source"] in ("training", "calibrated")
