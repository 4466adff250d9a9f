"""Set a BatchTopK SAE's inference threshold theta so that threshold mode gives a chosen mean L0.

Training estimates theta twice (a running mean during training, then a re-estimate with the final
weights); both depend on the training data. `calibrate` fixes theta on a store you choose, exactly:
threshold-mode L0 on that store equals the target (k by default), and cfg.json records which data
theta came from. SAELens reads the calibrated folder as a JumpReLU with theta as every threshold.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .sae import SAE, SAEConfigError, load_sae


def _store_batches(store, n: int, batch_size: int, hook: str | None):
    return (store.rows(s, min(s + batch_size, n), hook).float() for s in range(0, n, batch_size))


@torch.no_grad()
def calibrate(sae: SAE, store, target_l0: float | None = None, n_tokens: int | None = None,
              batch_size: int = 4096) -> dict:
    """Set sae's theta so that its threshold-mode L0 on the first n_tokens rows of `store` (all by
    default) is target_l0 (default: the SAE's k). Returns a record of the calibration, also kept in
    sae.theta_info (and so in cfg.json when the SAE is saved)."""
    from .activations import open_store
    from .metrics import per_token_l0

    if not sae.has_theta:
        raise SAEConfigError(f"calibration sets the global threshold of a BatchTopK-family SAE; a "
                             f"'{sae.cfg.arch}' SAE has none (JumpReLU learns one threshold per latent)")
    store = open_store(store) if isinstance(store, (str, Path)) else store
    target = float(target_l0 if target_l0 is not None else sae.cfg.k)
    if not target > 0:
        raise SAEConfigError(f"target L0 must be positive, got {target}")
    n = len(store) if n_tokens is None else min(int(n_tokens), len(store))
    hook = sae.cfg.hook_name if sae.cfg.hook_name in store.hooks else None
    if sae.cfg.d_in != store.d_model:
        raise SAEConfigError(f"the SAE has d_in={sae.cfg.d_in} but store {store.path} holds d={store.d_model}; "
                             f"calibrate on a store captured at the SAE's hook")
    sae.eval()
    before = float(per_token_l0(sae, store, n, batch_size=batch_size).mean()) if sae.has_threshold else None
    theta_before = float(sae.threshold) if sae.has_threshold else None
    theta = sae.threshold_for_l0(_store_batches(store, n, batch_size, hook), target, n)
    sae.set_threshold(theta)
    after = float(per_token_l0(sae, store, n, batch_size=batch_size).mean())
    record = {"source": "calibrated", "target_l0": target, "theta": theta, "store": str(store.path),
              "store_model": store.manifest.get("model"), "store_hook": hook or store.hook,
              "store_corpus": store.manifest.get("corpus"), "n_tokens": n,
              "l0_before": before, "l0_after": after, "theta_before": theta_before,
              "previous": sae.theta_info}
    sae.set_threshold(theta, record)
    return record


def calibrate_folder(sae_dir: str | Path, store, target_l0: float | None = None, n_tokens: int | None = None,
                     batch_size: int = 4096) -> dict:
    """calibrate() an SAE folder and write the new theta (and its record in cfg.json) back, atomically."""
    sae = load_sae(sae_dir)
    record = calibrate(sae, store, target_l0, n_tokens, batch_size)
    sae.save(sae_dir)
    return record
