import pytest
import torch

from saekit.sae import SAEConfig
from saekit.train import TrainConfig, train


def test_prefetcher_keeps_order_reports_waiting_and_passes_errors_on():
    import time as _time

    from saekit.train import Prefetcher

    def slow():
        for i in range(5):
            _time.sleep(0.02)
            yield torch.full((2, 3), float(i))

    p = Prefetcher(slow(), torch.device("cpu"), depth=2)
    got = [int(x[0, 0]) for x in p]
    assert got == [0, 1, 2, 3, 4] and p.wait_s > 0.02  # the consumer waited for the slow reader

    def broken():
        yield torch.zeros(2, 3)
        raise OSError("shard 3 is unreadable")

    with pytest.raises(OSError, match="shard 3"):
        list(Prefetcher(broken(), torch.device("cpu")))


def test_prefetched_training_equals_unprefetched_and_reports_data_share():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    cfg = SAEConfig(arch="batchtopk", d_in=16, d_sae=64, k=4)
    runs = []
    for prefetch in (0, 2):
        tc = TrainConfig(
            total_tokens=4096 * 2,
            batch_size=256,
            lr=1e-3,
            warmup_steps=2,
            progress=False,
            prefetch=prefetch,
        )
        runs.append(train(x, [cfg], tc))
    for a, b in zip(runs[0].saes[0].state_dict().values(), runs[1].saes[0].state_dict().values()):
        assert torch.equal(a, b)
    # reading time is measured with and without read-ahead
    assert all(0 < r.data_share < 1 for r in runs)
