"""The benchmark scripts run end to end at a tiny size (their timings are not asserted)."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_runs_and_matches_the_plain_step(tmp_path, store):
    from conftest import HOOK

    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--d", "32", "--f", "256",
                        "--batch", "128", "--k", "4", "--steps", "4", "--rounds", "2", "--json", str(out),
                        "--store", str(store.path), "--hook", HOOK, "--store-steps", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "ratio" in r.stdout and set(res) >= {"plain_batchtopk", "saekit_batchtopk", "saekit_topk",
                                                 "saekit_jumprelu", "saekit_relu", "saekit_matryoshka"}
    # same initial weights, same batches: the fast sparse step and the plain dense step agree
    assert abs(res["plain_batchtopk"]["loss"] - res["saekit_batchtopk"]["loss"]) < 1e-4
    assert all(v["tokens_per_s"] > 0 for k, v in res.items() if isinstance(v, dict) and "tokens_per_s" in v)
    assert res["rounds"] == 2 and all(lo <= res[k]["ratio"] <= hi for k in res if k.startswith("saekit_")
                                      for lo, hi in [res[k]["ratio_range"]])
    assert all(0 < v["data_share"] < 1 for v in res["store"].values()) and "data-loading share" in r.stdout
    assert res["toy"]["path"] == "reference" and res["toy"]["ratio"] > 0 and "toy size" in r.stdout
    from saekit.train.config import autocast_default

    assert res["toy"]["precision"] == ("bf16 autocast" if autocast_default("cpu", (4096, 48, 192)) else "fp32")
    assert res["tiny"]["precision"] == "fp32" and res["tiny"]["ratio"] > 0 and "tiny size" in r.stdout  # below 2^25
    assert all(0 < res[s]["ratio_range"][0] <= res[s]["ratio_range"][1] for s in ("toy", "tiny"))
    for s in ("toy", "tiny"):  # the interval: a bootstrap over the rounds, within their range
        lo, hi = res[s]["ratio_interval"]
        assert res[s]["ratio_range"][0] <= lo <= hi <= res[s]["ratio_range"][1] and len(res[s]["per_round"]) == res[s]["rounds"]


def test_capture_benchmark_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "capture.py"), "--hook", "resid_post.3",
                        "--batch-size", "2", "--seq-len", "32", "--batches", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "early-stop speed-up" in r.stdout and "x baseline" in r.stdout


def test_peers_benchmark_runs_every_method_on_a_store(store, tmp_path):
    from conftest import HOOK

    out = tmp_path / "peers.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--store", str(store.path),
                        "--hook", HOOK, "--f", "512", "--batch", "128", "--k", "4", "--steps", "6",
                        "--eval-tokens", "256", "--repeats", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["shape"]["d"] == store.d_model
    for m in ("plain", "saekit", "saelens", "sparsify"):
        assert res[m]["tokens_per_s"] > 0 and 0 < res[m]["nmse"] < 2 and res[m]["l0"] > 0, (m, res[m])
        assert f"{res[m]['saekit_speedup']:.2f}x" in r.stdout
    assert abs(res["sparsify"]["l0"] - 4) < 1e-6  # per-token TopK: exactly k everywhere
    assert res["saekit"]["saekit_speedup"] == 1.0


def test_encoder_start_benchmark_trains_each_start_on_one_stream(store, tmp_path):
    from conftest import HOOK

    out = tmp_path / "enc.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "enc_init.py"), "--store", str(store.path),
                        "--eval-store", str(store.path), "--hook", HOOK, "--batch", "128", "--k", "4",
                        "--steps", "5", "--eval-tokens", "512", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    # the default ("paper": sqrt(2 d / (8 d)) = 0.5 at 8x) runs first and is the baseline
    assert [round(v["start_norm"], 3) for v in res.values()] == [0.5, 1.0, 0.58, 0.2]
    assert res["paper's code (default)"]["nmse_vs_default"] == 1.0 and "paper's code (default)" in r.stdout
    assert all(0 < v["nmse"] < 2 and 0 <= v["dead_auxk_window"] <= 1 and v["l0"] > 0 for v in res.values())


def test_lr_default_benchmark_sweeps_around_the_default(store):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lr_default.py"), "--store", str(store.path),
                        "--eval-store", str(store.path), "--toy-sizes", "64", "--store-sizes", "1152",
                        "--toy-steps", "3", "--store-steps", "2", "--factors", "1", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.count("<- default") == 2 and out.count("default / best NMSE:") == 2  # one toy size, one store size
    assert "lr 1.28e-02 (x1)" in out  # 8e-4 / sqrt(64 / 2^14): the default for 64 latents
    for norm in ("token", "dataset", "none"):
        assert f"--normalize {norm}" in out


def test_gpu_script_dry_run_checks_every_path_and_writes_its_table(tmp_path):
    """benchmarks/gpu.py, the first GPU run, on the CPU at tiny shapes: every section runs and passes."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (md,) = tmp_path.glob("gpu-*-dry.md")
    res = json.loads(next(tmp_path.glob("gpu-*-dry.json")).read_text())
    assert res["failures"] == [] and r.stdout.rstrip().endswith(md.read_text().rstrip())  # the table comes last
    sections = {row["section"] for row in res["rows"]}
    assert sections == {"correctness", "train step", "kernels", "peers", "capture"}
    kernels = [row for row in res["rows"] if row["section"] == "kernels"]  # 4 + 3 + 3 methods, each checked
    assert len(kernels) == 10 and all(row["note"].startswith("ok") for row in kernels)
    checks = [row for row in res["rows"] if row["section"] == "correctness"]
    # fast vs reference for 5 architectures x 2 precisions, the selections without read-backs of BatchTopK, JumpReLU
    # and ReLU, the recordable step (step_graphs) against the eager one for BatchTopK and JumpReLU, theta, DDP
    assert len(checks) == 2 * 5 + 7 and all(row["note"].startswith("ok") for row in checks)
    assert all("path sparse" in row["note"] for row in checks if "fast vs reference" in row["what"])


def test_gpu_script_names_where_each_host_sync_was_called():
    """The sync count on a GPU says which line of saekit (or else which file) called each synchronizing operation."""
    import warnings

    from benchmarks import gpu

    msg = "called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:1)"
    caught = [warnings.WarningMessage(msg, UserWarning, "/x/saekit/train/trainer.py", 183),
              warnings.WarningMessage(msg, UserWarning, "/x/saekit/sae/kernels.py", 62),
              warnings.WarningMessage(msg, UserWarning, "/x/site-packages/torch/nn/utils/clip_grad.py", 40),
              warnings.WarningMessage("an unrelated warning", UserWarning, "/x/saekit/sae/base.py", 1)]
    assert gpu.sync_sites(caught) == ["train/trainer.py:183", "sae/kernels.py:62",
                                      "clip_grad.py:40 (called a synchronizing CUDA operation (T)"]


def test_gpu_script_fails_loudly(tmp_path, monkeypatch):
    """One section raising: the others still run, the table lists the failure, the exit code is non-zero."""
    from benchmarks import gpu

    def broken(run, dev, dry):
        raise RuntimeError("a broken kernel")

    def fine(run, dev, dry):
        run.check("fine", "a passing check", True, "1.0")

    monkeypatch.setattr(gpu, "SECTIONS", {"broken": broken, "fine": fine})
    assert gpu.main(["--dry", "--out", str(tmp_path)]) == 1
    md = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "FAILED" in md and "a broken kernel" in md and "a passing check" in md


def test_sparse_kernels_benchmark_checks_and_times_every_candidate(tmp_path):
    """benchmarks/sparse_kernels.py at a small shape: every product's candidates agree with saekit's result, each
    has a time and a ratio, and saekit's own is the 1.00x baseline of its product."""
    out = tmp_path / "k.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_kernels.py"), "--d", "16", "--d-sae", "96",
                        "--batch", "40", "--k", "3", "--rounds", "2", "--number", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    products = {row["product"] for row in rows}
    assert len(products) == 3 and len(rows) == 10 and "x = saekit's ms / this" in r.stdout
    for product in products:
        first = next(row for row in rows if row["product"] == product)
        assert "(saekit)" in first["method"] and first["x"] == 1.0 and first["rel_error"] == 0.0
    for row in rows:  # bf16 rounds to ~3 significant digits; fp32 kernels agree to float32 rounding
        assert row["rel_error"] < (1e-2 if "bf16" in row["method"] else 1e-4) and row["ms_range"][0] <= row["ms"], row


def test_step_ops_benchmark_counts_every_architectures_step(capsys):
    """benchmarks/step_ops.py: each architecture's step, the GPU's way and the CPU's, counted against the plain
    dense step's; BatchTopK's GPU-way step, with AuxK, theta and the dead-latent counters, dispatches no more
    operators than the plain step (the launches a GPU's host pays for)."""
    from benchmarks import step_ops

    got = step_ops.main(["--d", "16", "--d-sae", "256", "--batch", "64", "--k", "4"])
    out = capsys.readouterr().out
    assert len(got) == 11 and all(v > 0 for v in got.values())
    assert got["batchtopk GPU"] <= got["plain"] and got["matryoshka GPU"] > got["batchtopk GPU"]
    aux = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines() if line.startswith(("batchtopk", "topk"))}
    assert aux and all(v > 0 for v in aux.values())  # dead latents by then: AuxK is in the counted step


def test_profile_and_crossover_benchmarks_run():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--d-sae", "256", "--batch", "128",
                        "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    shares = {line.split()[0] for line in r.stdout.splitlines() if line.rstrip().endswith("%")}
    assert {"encode", "select", "AuxK", "Adam"} <= shares and "step (all)" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "crossover.py"), "--quick"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "by size" in r.stdout and "by density" in r.stdout and r.stdout.count("\n") > 8


def test_auxk_every_benchmark_times_and_evaluates_each_setting(store):
    from conftest import HOOK

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "auxk_every.py"), "--store", str(store.path),
                        "--eval-store", str(store.path), "--hook", HOOK, "--batch", "128", "--k", "4",
                        "--expansion", "2", "--steps", "6", "--every", "1", "3", "--eval-tokens", "512"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("0 ")]
    assert [row[1] for row in rows] == ["1", "3"] and rows[0][3] == "1.00x"
    assert "nmse every 3 − every 1" in r.stdout and all(0 < float(row[6]) < 2 for row in rows)


def test_autocast_cpu_benchmark_times_and_evaluates_both_precisions(store):
    from conftest import HOOK

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "autocast_cpu.py"), "--store", str(store.path),
                        "--eval-store", str(store.path), "--hook", HOOK, "--shapes", "16,64,256,4;24,96,128,4",
                        "--rounds", "2", "--speed-steps", "2", "--batch", "128", "--k", "4", "--expansion", "2",
                        "--steps", "6", "--eval-tokens", "512", "--archs", "batchtopk", "jumprelu",
                        "--seeds", "0", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "### batchtopk" in r.stdout and "### jumprelu" in r.stdout
    assert sum(line.strip().startswith("0 ") for line in r.stdout.splitlines()) == 4  # 2 archs x fp32, bf16
    over = [line for line in r.stdout.splitlines() if "NMSE difference over 2 seeds" in line]
    assert [line.split(":")[0] for line in over] == ["batchtopk", "jumprelu"] and all("t-interval" in x for x in over)
    speed = [line.split() for line in r.stdout.splitlines() if line.split()[:2] in (["16", "64"], ["24", "96"])]
    assert len(speed) == 2 and all(float(row[4]) > 0 and float(row[5]) > 0 and row[6].endswith("x") for row in speed)
    rows = {line.split()[1]: line.split() for line in r.stdout.splitlines() if line.strip().startswith("0 ")}
    assert set(rows) == {"fp32", "bf16"} and rows["fp32"][3] == "1.00x"
    assert "nmse bf16 − fp32" in r.stdout and all(0 < float(row[6]) < 2 for row in rows.values())


def test_autocast_cpu_benchmark_checks_the_size_rule_without_a_store():
    """--sizes: the speed part over sizes, with the default's choice at each (the size rule it is the evidence for)."""
    from saekit.train.config import autocast_default, cpu_has_bf16_hardware

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "autocast_cpu.py"), "--sizes",
                        "--shapes", "16,64,256,4;64,512,1024,8", "--rounds", "2", "--speed-steps", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:2] in (["16", "64"], ["64", "512"])]
    assert len(rows) == 2 and all(float(row[4]) > 0 and float(row[5]) > 0 and row[10] in ("yes", "no", "even")
                                  for row in rows)
    assert [row[9] for row in rows] == ["fp32", "bf16"]  # the size rule: 256 x 16 x 64 below, 1,024 x 64 x 512 at
    hw = cpu_has_bf16_hardware()
    assert autocast_default("cpu", (1024, 64, 512)) is hw and autocast_default("cpu", (256, 16, 64)) is False
    assert "rule: bf16 at >= 32M rows x d x d_sae" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "autocast_cpu.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "--store and --eval-store are needed" in r.stderr


def test_step_variants_and_data_loading_benchmarks_run(store):
    from conftest import HOOK

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_variants.py"), "--d", "32", "--d-sae", "1024",
                        "--batch", "128", "--steps", "2", "--rounds", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    names = ("current", "bias after product", "sync-free selection", "read-back selection", "theta hint (before)",
             "input grad (before)", "AuxK scatter (before)", "AuxK fp32 (before)")
    rows = {line[:22].strip(): line.split() for line in r.stdout.splitlines() if line[:22].strip() in names}
    assert len(rows) == 8 and rows["current"][-2:] == ["1.000", "1.000-1.000"]
    assert all(float(v[-3]) > 0 for v in rows.values())  # ms per step
    # the listing of read-backs: none in the sync-free step; the exact selection's nonzero and the dead latents'
    assert "'sync-free selection' (at dispatch, besides the Trainer's one .tolist()): 0" in r.stdout
    assert "'read-back selection' (at dispatch, besides the Trainer's one .tolist()): 2" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_variants.py"), "--arch", "jumprelu", "--d", "32",
                        "--d-sae", "1024", "--batch", "128", "--steps", "2", "--rounds", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    names = ("current", "probe every step", "sync-free entries", "split code, window")
    rows = {line[:22].strip(): line.split() for line in r.stdout.splitlines() if line[:22].strip() in names}
    assert len(rows) == 4 and float(rows["split code, window"][-3]) > 0 and "jumprelu step variants" in r.stdout
    # the entries found with one read-back (a nonzero's size), or into slots without one
    assert "'current' (at dispatch, besides the Trainer's one .tolist()): 1" in r.stdout
    assert "'sync-free entries' (at dispatch, besides the Trainer's one .tolist()): 0" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_variants.py"), "--arch", "matryoshka", "--d",
                        "32", "--d-sae", "1024", "--batch", "128", "--steps", "2", "--rounds", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode per group" in r.stdout  # the per-group masks read back; one decode of every part does not
    assert "'current' (at dispatch, besides the Trainer's one .tolist()): 1" in r.stdout
    assert "'decode per group' (at dispatch, besides the Trainer's one .tolist()): 17" in r.stdout
    ops = {m[0]: int(m[1]) for m in re.findall(r"'(.+?)': (\d+) operators dispatched", r.stdout)}
    assert ops["current"] < ops["decode twice (before)"]  # the code decoded once, not again for x_hat
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_loading.py"), "--store", str(store.path),
                        "--hook", HOOK, "--steps", "4", "--batch", "64", "--repeats", "1", "--warm-only"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    warm = [line.split() for line in r.stdout.splitlines() if line.startswith("warm")]
    assert [w[1] for w in warm] == ["on", "off"] and all(0 <= float(w[2].rstrip("%,")) < 100 for w in warm)


def test_selection_hint_benchmark_runs(store):
    from conftest import HOOK

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "selection_hint.py"), "--store", str(store.path),
                        "--hook", HOOK, "--steps", "5", "--batch", "64", "--d-sae", "512", "--k", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split()[-11:] for line in r.stdout.splitlines() if line.startswith(("theta", "previous cut"))]
    assert len(rows) == 6
    for factor, lo, mid, hi, below, _, steps, over, *_ in rows:
        assert 0 < float(lo) <= float(mid) <= float(hi) and int(steps) == 4  # steps 1-4: the hints exist from step 1
        assert 0 <= int(below) <= 4 and 0 <= int(over) <= 4
