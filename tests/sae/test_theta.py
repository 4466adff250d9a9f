import torch

from saekit.sae import (
    TrainOutput,
    make_sae,
)


def test_theta_is_the_mean_of_the_first_cuts_then_a_moving_average():
    """BatchTopK's training theta: the plain mean of the first 1 / (1 - threshold_beta) cuts, then
    an exponential moving average with weight 1 - threshold_beta on each new cut (one update per
    training step, on the device)."""
    import numpy as np

    from saekit.sae.theta import running_update

    sae = make_sae(arch="batchtopk", d_in=8, d_sae=32, k=2, threshold_beta=0.9)
    cuts = np.random.default_rng(0).uniform(0.5, 2.0, 25)
    expect = []
    for n, c in enumerate(cuts, 1):
        running_update(
            sae.threshold, sae.threshold_updates, torch.tensor(c, dtype=torch.float32), 0.9
        )
        w = max(0.1, 1 / n)
        expect.append(c if n == 1 else expect[-1] + w * (c - expect[-1]))
        assert abs(float(sae.threshold) - expect[-1]) < 1e-5 * expect[-1]
        assert int(sae.threshold_updates) == n
    assert abs(expect[9] - cuts[:10].mean()) < 1e-9  # the first 10 (= 1 / (1 - 0.9)): their mean
    assert sae.threshold.dtype == torch.float32
    # a cut from a bf16 selection (autocast), as after_step gives it
    sae.after_step(TrainOutput(*[None] * 6, cut=torch.tensor(3.0, dtype=torch.bfloat16)))
    assert sae.threshold.dtype == torch.float32 and float(sae.threshold) > expect[-1]


def test_theta_estimates_are_the_batch_cut_averaged_or_pooled():
    """saekit.sae.theta.estimate: per batch, the smallest of the top B*k pre-activations, averaged
    over batches; pooled over n tokens, a value that gives exactly that mean L0 in threshold
    mode."""
    from saekit.sae import batch_topk
    from saekit.sae.theta import estimate

    torch.manual_seed(0)
    sae = make_sae(arch="batchtopk", d_in=8, d_sae=32, k=3)
    xs = [torch.randn(20, 8) for _ in range(4)]
    cuts = [sae.pre_acts(sae.prepare(x)).detach().flatten().topk(60).values.min() for x in xs]
    mean, n = estimate(sae, xs, 3)
    assert n == 4 and abs(mean - float(torch.stack(cuts).mean())) < 1e-6
    assert torch.equal(batch_topk(sae.pre_acts(sae.prepare(xs[0])), 3).cut, cuts[0])
    pooled, n = estimate(sae, xs, 3, n_tokens=80)
    a = torch.cat([sae.pre_acts(sae.prepare(x)) for x in xs])
    assert n == 80 and int((a > pooled).sum()) == 240
