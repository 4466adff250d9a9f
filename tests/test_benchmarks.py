"""The benchmark scripts run end to end at a tiny size (their timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_runs_and_matches_the_plain_step(tmp_path, store):
    from conftest import HOOK

    out = tmp_path / "r.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "train_step.py"),
            "--d",
            "32",
            "--f",
            "256",
            "--batch",
            "128",
            "--k",
            "4",
            "--steps",
            "4",
            "--rounds",
            "2",
            "--json",
            str(out),
            "--store",
            str(store.path),
            "--hook",
            HOOK,
            "--store-steps",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "ratio" in r.stdout and set(res) >= {
        "plain_batchtopk",
        "saekit_batchtopk",
        "saekit_topk",
        "saekit_jumprelu",
        "saekit_relu",
        "saekit_matryoshka",
    }
    # same initial weights, same batches: the fast sparse step and the plain dense step agree
    assert abs(res["plain_batchtopk"]["loss"] - res["saekit_batchtopk"]["loss"]) < 1e-4
    assert all(
        v["tokens_per_s"] > 0 for k, v in res.items() if isinstance(v, dict) and "tokens_per_s" in v
    )
    assert res["rounds"] == 2 and all(
        lo <= res[k]["ratio"] <= hi
        for k in res
        if k.startswith("saekit_")
        for lo, hi in [res[k]["ratio_range"]]
    )
    assert (
        all(0 < v["data_share"] < 1 for v in res["store"].values())
        and "data-loading share" in r.stdout
    )
    assert res["toy"]["path"] == "reference" and res["toy"]["ratio"] > 0 and "toy size" in r.stdout
    from saekit.train.config import autocast_default

    assert res["toy"]["precision"] == (
        "bf16 autocast" if autocast_default("cpu", (4096, 48, 192)) else "fp32"
    )
    assert (
        res["tiny"]["precision"] == "fp32" and res["tiny"]["ratio"] > 0 and "tiny size" in r.stdout
    )  # below 2^25
    assert all(0 < res[s]["ratio_range"][0] <= res[s]["ratio_range"][1] for s in ("toy", "tiny"))
    for s in ("toy", "tiny"):  # the interval: a bootstrap over the rounds, within their range
        lo, hi = res[s]["ratio_interval"]
        assert (
            res[s]["ratio_range"][0] <= lo <= hi <= res[s]["ratio_range"][1]
            and len(res[s]["per_round"]) == res[s]["rounds"]
        )


def test_capture_benchmark_runs(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "capture.py"),
            "--hook",
            "resid_post.3",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--batches",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "early-stop speed-up" in r.stdout and "x baseline" in r.stdout


def test_peers_benchmark_runs_every_method_on_a_store(store, tmp_path):
    from conftest import HOOK

    out = tmp_path / "peers.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "peers.py"),
            "--store",
            str(store.path),
            "--hook",
            HOOK,
            "--f",
            "512",
            "--batch",
            "128",
            "--k",
            "4",
            "--steps",
            "6",
            "--eval-tokens",
            "256",
            "--repeats",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["shape"]["d"] == store.d_model
    for m in ("plain", "saekit", "saelens", "sparsify"):
        assert res[m]["tokens_per_s"] > 0 and 0 < res[m]["nmse"] < 2 and res[m]["l0"] > 0, (
            m,
            res[m],
        )
        assert f"{res[m]['saekit_speedup']:.2f}x" in r.stdout
    assert abs(res["sparsify"]["l0"] - 4) < 1e-6  # per-token TopK: exactly k everywhere
    assert res["saekit"]["saekit_speedup"] == 1.0


def test_gpu_script_dry_run_checks_every_path_and_writes_its_table(tmp_path):
    """benchmarks/gpu.py, the first GPU run, on the CPU at tiny shapes: every section runs and
    passes."""
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (md,) = tmp_path.glob("gpu-*-dry.md")
    res = json.loads(next(tmp_path.glob("gpu-*-dry.json")).read_text())
    # the table comes last
    assert res["failures"] == [] and r.stdout.rstrip().endswith(md.read_text().rstrip())
    sections = {row["section"] for row in res["rows"]}
    assert sections == {"correctness", "train step", "peers", "capture", "stream"}
    checks = [row for row in res["rows"] if row["section"] == "correctness"]
    # fast vs reference for 5 architectures x 2 precisions, the selections without read-backs of
    # BatchTopK, JumpReLU and ReLU, the recordable step (step_graphs) against the eager one for
    # BatchTopK and JumpReLU, theta, DDP
    assert len(checks) == 2 * 5 + 7 and all(row["note"].startswith("ok") for row in checks)
    assert all("path sparse" in row["note"] for row in checks if "fast vs reference" in row["what"])


def test_gpu_script_names_where_each_host_sync_was_called():
    """The sync count on a GPU says which line of saekit (or else which file) called each
    synchronizing operation."""
    import warnings

    from benchmarks import gpu

    msg = "called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:1)"
    caught = [
        warnings.WarningMessage(msg, UserWarning, "/x/saekit/train/trainer.py", 183),
        warnings.WarningMessage(msg, UserWarning, "/x/saekit/sae/fast/select.py", 62),
        warnings.WarningMessage(
            msg, UserWarning, "/x/site-packages/torch/nn/utils/clip_grad.py", 40
        ),
        warnings.WarningMessage("an unrelated warning", UserWarning, "/x/saekit/sae/base.py", 1),
    ]
    assert gpu.sync_sites(caught) == [
        "train/trainer.py:183",
        "sae/fast/select.py:62",
        "clip_grad.py:40 (called a synchronizing CUDA operation (T)",
    ]


def test_gpu_script_fails_loudly(tmp_path, monkeypatch):
    """One section raising: the others still run, the table lists the failure, the exit code is
    non-zero."""
    from benchmarks import gpu

    def broken(run, dev, dry):
        raise RuntimeError("a broken kernel")

    def fine(run, dev, dry):
        run.check("fine", "a passing check", True, "1.0")

    monkeypatch.setattr(gpu, "SECTIONS", {"broken": broken, "fine": fine})
    assert gpu.main(["--dry", "--out", str(tmp_path)]) == 1
    md = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "FAILED" in md and "a broken kernel" in md and "a passing check" in md


def test_stream_benchmark_runs_both_ways_and_reports_memory(tmp_path):
    """benchmarks/stream.py at a tiny size: streaming against capture-then-train and SAELens's
    on-the-fly trainer with held-out NMSE, three hooks from one forward, and the memory mode's two
    sizes."""
    out = tmp_path / "s.json"
    small = ["--batch", "128", "--window", "2"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stream.py"), "--tokens", "512",
         "--hook", "resid_post.4", *small, "--saelens-buffer", "2", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert all(0 < res[x]["forward_share"] < 1 and res[x]["nmse"] > 0 for x in ("a", "b", "c"))
    assert (
        res["a_over_b"] > 0
        and res["a_over_c"] > 0
        and res["three_hooks"]["hooks"] == [f"resid_post.{i}" for i in (0, 2, 4)]
    )
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stream.py"), "--memory", "--sizes", "256",
         "512", "--hook", "resid_post.1", *small, "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [s["tokens"] for s in res["sizes"]] == [256, 512]
    assert all(s["peak_rss_mb"] > 0 and s["disk_mb"] > 0 for s in res["sizes"])
