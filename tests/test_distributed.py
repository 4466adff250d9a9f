"""torch.distributed on CPU (gloo, 2 processes under torchrun): a distributed step gives the weights
of one process stepping on the combined batch, BatchTopK selects over the global batch, the CLI
trains, checkpoints once and resumes; capture under torchrun writes the store one process would,
and resumes with any rank count."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HOOK
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, timeout=600):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        *args,
    ]
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
        torch.testing.assert_close(
            got[name], v, rtol=1e-4, atol=1e-5, msg=f"{arch}: {name} differs"
        )
    per_rank = torch.tensor(result[arch]["latents_per_rank"])  # [rank, step]
    torch.testing.assert_close(per_rank.sum(0), torch.tensor(single_counts), rtol=0, atol=0.5)
    assert result[arch]["tokens"] == steps * B and result[arch]["step"] == steps


def test_batchtopk_selects_over_the_global_batch(dist_run):
    _, result = dist_run
    k, B = 4, 64
    # bf16: values tie at the cut on both ranks, taken in rank order
    for run in ("batchtopk", "batchtopk_bf16"):
        per_rank = torch.tensor(result[run]["latents_per_rank"])
        # exactly k per token on average over the global batch
        assert (per_rank.sum(0) == B * k).all(), run
        # rank 1's larger rows take more than half
        assert (per_rank[1] > per_rank[0] + B * k // 4).all(), run


def test_torchrun_cli_trains_checkpoints_once_and_resumes(store, tmp_path):
    out = tmp_path / "run"
    args = [
        "-m",
        "saekit",
        "train",
        "--store",
        str(store.path),
        "--hook",
        HOOK,
        "--arch",
        "batchtopk",
        "--k",
        "8",
        "--expansion",
        "2",
        "--batch-size",
        "128",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "4",
        "--out",
        str(out),
    ]
    r = torchrun(*args, "--tokens", str(128 * 8))
    # rank 0 reports, once
    assert sum(line.startswith("batchtopk_k8_") for line in r.stdout.splitlines()) == 1
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["steps"] == 8 and cfg["tokens"] == 128 * 8
    name = cfg["names"][0]
    assert (out / name / "cfg.json").exists() and not list(out.glob("**/.tmp_*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000004",
        "step_00000008",
    ]
    trained = load_file(str(out / name / "sae_weights.safetensors"))
    log = (out / name / "train_log.csv").read_text()
    shutil.rmtree(out / "checkpoints" / "step_00000008")  # as if killed after step 4's checkpoint
    (out / name / "sae_weights.safetensors").unlink()
    torchrun(*args, "--tokens", str(128 * 8))  # resumes at step 4: 4 more steps to the same weights
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["steps"] == 8 and cfg["tokens"] == 128 * 8
    again = load_file(str(out / name / "sae_weights.safetensors"))
    for k in trained:
        torch.testing.assert_close(again[k], trained[k], rtol=1e-5, atol=1e-6)
    assert (out / name / "train_log.csv").read_text() == log
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            *args,
            "--tokens",
            str(128 * 12),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    # another budget is another run
    assert r.returncode != 0 and "--tokens: 1024 then, 1536 now" in r.stderr


CAPTURE = [
    "-m",
    "saekit",
    "capture",
    "--hook",
    "resid_post.2",
    "--hook",
    "mlp_out.1",
    "--tokens",
    "1500",
    "--seq-len",
    "64",
    "--shard-tokens",
    "256",
    "--dtype",
    "float32",
]


def _rows_by_position(path):
    """Every hook's rows and the positions, sorted by (sequence, position)."""
    from saekit.activations import ActivationStore

    st = ActivationStore(path)
    pos = st.positions()
    order = np.lexsort((pos[:, 1], pos[:, 0]))
    return pos[order], {h: st.load(h)[order] for h in st.hooks}, st.manifest


def _single(out):
    r = subprocess.run(
        [sys.executable, *CAPTURE, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def _assert_same_store(a, b):
    pa, xa, ma = _rows_by_position(a)
    pb, xb, mb = _rows_by_position(b)
    np.testing.assert_array_equal(pa, pb)
    assert len(np.unique(pa, axis=0)) == len(pa)  # no token twice
    for h in xa:
        assert torch.equal(xa[h], xb[h]), h
    assert (
        ma["complete"]
        and mb["complete"]
        and ma["n_rows"] == mb["n_rows"]
        and ma["shards"] == mb["shards"]
    )


def _kill_after(path, finished_in_manifest, finished_unfolded):
    """The state a killed capture leaves: the manifest lists some shards, ranks finished others
    whose completion records rank 0 had not folded in yet, one shard has its activations but no
    record (killed mid-shard), the rest are missing, and an atomic write was cut short."""
    m = json.loads((path / "manifest.json").read_text())
    n = len(m["shards"])
    keep = set(finished_in_manifest) | set(finished_unfolded)
    for i in range(n):
        if i not in keep:
            for f in path.glob(f"shards/{i:05d}.*"):
                if not (i == max(set(range(n)) - keep) and f.name.endswith("resid_post.2.npy")):
                    f.unlink()
    m["shards"] = [s for s in m["shards"] if s["index"] in finished_in_manifest]
    m["n_rows"], m["complete"] = sum(s["n_rows"] for s in m["shards"]), False
    (path / "manifest.json").write_text(json.dumps(m))
    (path / "shards" / ".00005.pos.npy.x1y2.tmp").write_bytes(b"half")


def test_torchrun_capture_equals_one_process_and_resumes_with_another_rank_count(tmp_path):
    """2 gloo ranks capture disjoint shards into one store equal, row for row, to a single
    process's; a killed capture resumes with another number of ranks with no token lost or
    duplicated."""
    torchrun(*CAPTURE, "--out", str(tmp_path / "two"))
    _single(tmp_path / "one")
    names = sorted(p.name for p in (tmp_path / "two" / "shards").iterdir())
    assert len(names) == len(set(names)) and sum(n.endswith(".done.json") for n in names) == 6
    _assert_same_store(tmp_path / "two", tmp_path / "one")

    # killed under 2 ranks, resumed by 1 process
    shutil.copytree(tmp_path / "two", tmp_path / "resume1")
    _kill_after(tmp_path / "resume1", finished_in_manifest=[0, 1], finished_unfolded=[3])
    _single(tmp_path / "resume1")
    _assert_same_store(tmp_path / "resume1", tmp_path / "one")
    assert not list((tmp_path / "resume1" / "shards").glob(".*.tmp"))

    # killed as 1 process, resumed by 2 ranks
    shutil.copytree(tmp_path / "one", tmp_path / "resume2")
    _kill_after(tmp_path / "resume2", finished_in_manifest=[0, 1, 2], finished_unfolded=[])
    torchrun(*CAPTURE, "--out", str(tmp_path / "resume2"))
    _assert_same_store(tmp_path / "resume2", tmp_path / "one")
