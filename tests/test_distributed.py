"""torch.distributed training on CPU (gloo, 2 processes under torchrun): a distributed step gives the
weights of one process stepping on the combined batch, BatchTopK selects over the global batch, and the
CLI trains, checkpoints once and resumes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import HOOK

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(str(Path(__file__).parent / "dist_worker.py"), str(out))
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("arch", dist_worker.ARCHS)
def test_distributed_steps_equal_one_process_on_the_combined_batch(dist_run, arch):
    out, result = dist_run
    steps, B = 6, 64
    x = dist_worker.global_batches(steps, B, 16)
    tr = dist_worker.setup(arch, 1, steps, B)
    tr.initialise(x[0])
    single_counts = [tr.train_step(x[s])[0]["l0"] * B for s in range(steps)]
    got = load_file(str(out / f"{arch}.safetensors"))
    want = tr.saes[0].state_dict()
    assert set(got) == set(want)
    start = dist_worker.setup(arch, 1, steps, B).saes[0].state_dict()
    assert (want["W_enc"] - start["W_enc"]).abs().max() > 1e-3  # the weights really moved
    for name, v in want.items():
        torch.testing.assert_close(got[name], v, rtol=1e-4, atol=1e-5, msg=f"{arch}: {name} differs")
    per_rank = torch.tensor(result[arch]["latents_per_rank"])  # [rank, step]
    torch.testing.assert_close(per_rank.sum(0), torch.tensor(single_counts), rtol=0, atol=0.5)
    assert result[arch]["tokens"] == steps * B and result[arch]["step"] == steps


def test_batchtopk_selects_over_the_global_batch(dist_run):
    _, result = dist_run
    per_rank = torch.tensor(result["batchtopk"]["latents_per_rank"])
    k, B = 4, 64
    assert (per_rank.sum(0) == B * k).all()  # exactly k per token on average over the global batch
    assert (per_rank[1] > per_rank[0] + B * k // 4).all()  # rank 1's larger rows take more than half


def test_torchrun_cli_trains_checkpoints_once_and_resumes(store, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "saekit", "train", "--store", str(store.path), "--hook", HOOK, "--arch", "batchtopk", "--k", "8",
            "--expansion", "2", "--batch-size", "128", "--lr", "1e-3", "--warmup-steps", "2",
            "--checkpoint-every", "4", "--out", str(out)]
    r = torchrun(*args, "--tokens", str(128 * 8))
    assert sum(line.startswith("batchtopk_k8_") for line in r.stdout.splitlines()) == 1  # rank 0 reports, once
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["steps"] == 8 and cfg["tokens"] == 128 * 8
    name = cfg["names"][0]
    assert (out / name / "cfg.json").exists() and not list(out.glob("**/.tmp_*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    torchrun(*args, "--tokens", str(128 * 12))  # resume: 4 more steps on top of the 8
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["steps"] == 12 and cfg["tokens"] == 128 * 12
    import pandas as pd

    log = pd.read_csv(out / name / "train_log.csv")
    assert log["step"].tolist() == [8, 10, 12]  # the first run's log (its last step) kept on resume
