"""A stream across ranks (gloo, 2 processes under torchrun): each rank streams its own documents,
the global batch top-k holds, checkpoints record both ranks' lanes, and the run ends at the weights
of one process that serves the same two lanes side by side."""

import itertools
import json
import math

import test_distributed as td
import torch
from safetensors.torch import load_file

from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer
from saekit.train.stream import ModelSource

HOOK, B = "resid_post.2", 128


def test_two_ranks_train_as_one_process_serving_both_lanes(model, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "saekit", "train", "--model", "embedded", "--hook", HOOK, "--arch", "batchtopk",
            "--k", "8", "--expansion", "2", "--batch-size", str(B), "--tokens", str(B * 6),
            "--window-batches", "2", "--warmup-steps", "2", "--checkpoint-every", "3",
            "--precision", "fp32",
            "--out", str(out)]  # fmt: skip
    td.torchrun(*args)
    run = json.loads((out / "train_config.json").read_text())
    state = json.loads((out / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert set(state["stream"]["lanes"]) == {"0", "1"}  # both ranks' lanes, gathered
    tc = TrainConfig.from_dict({**run["train"], "progress": False})
    cfg = SAEConfig.from_dict(run["saes"][0])
    # rank 0 drew the start (lane 0's first batches of B / 2) and sent it to rank 1
    init = ModelSource(model, HOOK, window_batches=2).batches(
        B // 2, seed=tc.seed, rank=0, world_size=2
    )
    sample = torch.cat(list(itertools.islice(init, math.ceil(tc.init_tokens / (B // 2)))))
    one = Trainer([cfg], tc)
    one.initialise(sample)
    one.fit(ModelSource(model, HOOK, window_batches=2, lanes=2))
    got = load_file(str(out / run["names"][0] / "sae_weights.safetensors"))
    want = one.saes[0].weights()
    # θ is each rank's estimate averaged (over lane batches of B / 2), one process's over both: not
    # compared; every weight is
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
