"""The data-loading share of the training loop from an activation store, with the page cache cold (the store's
pages dropped before each run, as on a first epoch or a store larger than RAM) and warm, with and without the
kernel read-ahead of the next shuffle buffer (`ActivationStore._advise`, posix_fadvise WILLNEED). Settings
alternate run by run; the figure is the share of the loop spent waiting for batches and tokens/s.

    python benchmarks/data_loading.py --store runs/smollm2_l15/store_train --hook resid_post.15 [--steps 300]

Dropping the page cache needs root on Linux (`/proc/sys/vm/drop_caches`); without it only warm runs are made.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess

from saekit.activations import ActivationStore
from saekit.sae import SAEConfig
from saekit.train import TrainConfig, Trainer


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def advice(on: bool):
    if on:
        yield
        return
    real = ActivationStore._advise
    ActivationStore._advise = lambda self, group, hook: None
    try:
        yield
    finally:
        ActivationStore._advise = real


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--hook", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warm-only", action="store_true", help="leave the page cache alone (no root needed)")
    a = ap.parse_args(argv)
    store = ActivationStore(a.store, a.hook)
    cold = not a.warm_only and drop_page_cache()
    settings = [(c, adv) for c in ((True, False) if cold else (False,)) for adv in (True, False)]
    got = {s: [] for s in settings}
    for _ in range(a.repeats):
        for c, adv in settings:
            if c:
                drop_page_cache()
            cfg = SAEConfig(arch="batchtopk", d_in=store.d_model, d_sae=8 * store.d_model, k=32)
            tc = TrainConfig(total_tokens=a.steps * a.batch, batch_size=a.batch, warmup_steps=0, progress=False,
                             prefetch=0, calibrate_batches=0, init_tokens=a.batch)
            with advice(adv):
                res = Trainer([cfg], tc).fit(store, hook=a.hook)
            got[(c, adv)].append((res.data_share, res.tokens / res.seconds))
    print(f"store {a.store} ({store.dtype}, {len(store):,} rows), batch {a.batch}, {a.steps} steps, shuffle buffer "
          f"{tc.buffer_rows:,} rows, no read-ahead thread, {os.cpu_count()} CPUs; {a.repeats} runs per setting, "
          f"settings alternating{'' if cold else '; warm page cache only (--warm-only, or not root)'}")
    print(f"{'page cache':<12}{'kernel read-ahead':<20}{'data share (runs)':<26}{'tokens/s (median)':>18}")
    for (c, adv), runs in got.items():
        shares = ", ".join(f"{s:.1%}" for s, _ in runs)
        print(f"{'cold' if c else 'warm':<12}{'on' if adv else 'off':<20}{shares:<26}"
              f"{statistics.median(t for _, t in runs):>18,.0f}")


if __name__ == "__main__":
    main()
