"""The README's main job end to end, at a tiny size: capture, train BatchTopK + TopK, evaluate,
report."""

import json
import subprocess
import sys


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = [
        sys.executable,
        "-m",
        "saekit",
        "demo",
        "--out",
        str(out),
        "--hook",
        "resid_post.4",
        "--tokens",
        "3000",
        "--eval-tokens",
        "800",
        "--calib-tokens",
        "600",
        "--train-tokens",
        "6144",
        "--batch-size",
        "256",
        "--expansion",
        "2",
        "--k",
        "8",
        "--ce-tokens",
        "300",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CE recovered" in r.stdout and "report.html" in r.stdout and "300 positions" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["schema"] == "saekit.eval/2" and m["sae"]["architecture"] == "batchtopk"
    # both L0s (batch mode is k by construction), theta before and after calibration, the
    # CE sample, intervals
    assert (
        m["l0_batch_mode"] == 8.0
        and m["sparsity"]["l0_batch_mode"] == 8.0
        and 0 < m["reconstruction"]["nmse"] < 1
    )
    assert m["l0_threshold_mode_trained_theta"] > 0 and m["theta_trained"] > 0 and m["theta"] > 0
    assert m["sae"]["theta_info"]["source"] == "calibrated" and m["sae"]["theta_info"][
        "store"
    ].endswith("store_calib")
    assert (
        m["ce_tokens"] == m["downstream"]["n_tokens"] >= 300 and m["downstream"]["n_sequences"] >= 3
    )
    for name in ("nmse", "l0", "ce_recovered", "kl"):
        lo, hi = m["intervals"][name]
        assert lo < hi
    assert m["lr"] > 0 and "learning rate" in r.stdout
    from saekit.sae import SAEConfig
    from saekit.train import TrainConfig

    # the precision the demo trained at, recorded
    run = json.loads((out / "train" / "train_config.json").read_text())
    tc, cfg = TrainConfig.from_dict(run["train"]), SAEConfig.from_dict(run["saes"][0])
    # the default at its size
    assert m["autocast"] is run["autocast"][0] is tc.uses_autocast("cpu", cfg)
    assert (
        f"{'bf16 autocast' if m['autocast'] else 'fp32'} (the default at this size on this cpu)"
        in r.stdout
    )
    assert m["downstream"]["ce_sae"] >= m["downstream"]["ce_clean"] - 0.05
    for name in ("batchtopk_k8_1152", "topk_k8_1152"):
        assert (out / "train" / name / "sae_weights.safetensors").exists()
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly inlined
    # a second run reuses the stores and the finished training instead of recomputing
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["reconstruction"] == m["reconstruction"]
