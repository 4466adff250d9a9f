import json
import subprocess
import sys

from saekit.sae import load_sae


def test_cli_capture_train_eval(tmp_path):
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "saekit", *a], capture_output=True, text=True, timeout=600
    )
    r = run(
        "capture",
        "--hook",
        "resid_post.2",
        "--tokens",
        "1500",
        "--seq-len",
        "64",
        "--out",
        str(tmp_path / "st"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(
        "train",
        "--store",
        str(tmp_path / "st"),
        "--arch",
        "batchtopk",
        "topk",
        "--k",
        "8",
        "--expansion",
        "2",
        "--tokens",
        "3000",
        "--batch-size",
        "256",
        "--enc-init-norm",
        "0.7",
        "--precision",
        "fp32",
        "--out",
        str(tmp_path / "tr"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batchtopk_k8_1152" in r.stdout and "topk_k8_1152" in r.stdout
    # the flag reached the config
    assert load_sae(tmp_path / "tr" / "topk_k8_1152").cfg.enc_init_norm == 0.7
    assert "precision: fp32 on cpu" in r.stdout  # --precision reached the trainer, and its record
    assert json.loads((tmp_path / "tr" / "train_config.json").read_text())["autocast"] == [
        False,
        False,
    ]
    r = run(
        "eval",
        str(tmp_path / "tr" / "batchtopk_k8_1152"),
        "--store",
        str(tmp_path / "st"),
        "--json",
        "--ce-tokens",
        "60",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert m["sae"]["architecture"] == "batchtopk" and 0 < m["reconstruction"]["nmse"] < 1.5
    assert m["n_tokens"] >= 1500 and m["downstream"]["ce_sae"] > m["downstream"]["ce_clean"]
    r = run("capture", "--hook", "resid_post.99", "--tokens", "100", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "out of range" in r.stderr
    r = run("train", "--store", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no activations" in r.stderr
