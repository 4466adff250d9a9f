"""Set a BatchTopK SAE's inference threshold theta so that threshold mode gives a chosen mean L0.

Training estimates theta twice (a running mean during training, then a re-estimate with the final
weights; saekit.sae.theta); both depend on the training data. `calibrate` fixes theta on a store you
choose, exactly: threshold-mode L0 on that store equals the target (k by default), and cfg.json
records which data theta came from. SAELens reads the calibrated folder as a JumpReLU with theta as
every threshold.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sae import SAE, SAEConfigError, load_sae
from .sae import theta as T


@torch.no_grad()
def threshold_for_l0(sae: SAE, batches, target_l0: float, n_tokens: int) -> float:
    """The θ at which a BatchTopK SAE's threshold mode gives exactly `target_l0` latents per token
    on average over `batches` (input space [B, d_in], n_tokens rows in all):
    saekit.sae.theta.estimate, pooled."""
    theta, n = T.estimate(sae, batches, target_l0, n_tokens)
    if n != n_tokens:
        raise SAEConfigError(f"the batches held {n} tokens, not the {n_tokens} announced")
    if theta is None:
        raise SAEConfigError(
            f"fewer than {int(round(n * target_l0))} positive activations on {n} tokens: a mean L0 "
            f"of {target_l0} cannot be reached; choose a smaller target"
        )
    return theta


def _check_request(sae: SAE, target_l0: float | None, n_tokens: int | None) -> float:
    """The target L0 of a calibration (the SAE's k by default), once the request is checked."""
    if not sae.has_theta:
        raise SAEConfigError(
            f"calibration sets the global threshold of a BatchTopK-family SAE; a "
            f"'{sae.cfg.arch}' SAE has none (JumpReLU learns one threshold per latent)"
        )
    target = float(target_l0 if target_l0 is not None else sae.cfg.k)
    if not 0 < target < sae.cfg.d_sae:  # also refuses NaN and inf
        raise SAEConfigError(
            f"target L0 must be above 0 and below the {sae.cfg.d_sae:,} latents, got {target}"
        )
    if n_tokens is not None and n_tokens < 1:
        raise SAEConfigError(
            f"n_tokens must be at least 1 (got {n_tokens}); None uses the whole store"
        )
    return target


@torch.no_grad()
def calibrate(
    sae: SAE,
    store,
    target_l0: float | None = None,
    n_tokens: int | None = None,
    batch_size: int = 4096,
    hook: str | None = None,
    allow_mismatch: bool = False,
) -> dict:
    """Set sae's theta so that its threshold-mode L0 on the first n_tokens rows of `store` (all by
    default) is target_l0 (default: the SAE's k). Returns a record of the calibration, also kept in
    sae.theta_info (and so in cfg.json when the SAE is saved). The store must hold the SAE's hook of
    the SAE's model (saekit.plumbing.checks) unless allow_mismatch."""
    from .activations import open_store
    from .metrics import per_token_l0
    from .plumbing.checks import hook_on_store

    target = _check_request(sae, target_l0, n_tokens)
    store = open_store(store) if isinstance(store, (str, Path)) else store
    n = len(store) if n_tokens is None else min(int(n_tokens), len(store))
    hook = hook_on_store(sae, store, hook, allow_mismatch)
    sae.eval()

    def l0() -> float:
        return float(
            per_token_l0(
                sae, store, n, batch_size=batch_size, hook=hook, allow_mismatch=True
            ).mean()
        )

    before = l0() if sae.has_threshold else None
    theta_before = float(sae.threshold) if sae.has_threshold else None
    theta = threshold_for_l0(sae, store.head_batches(n, batch_size, hook), target, n)
    sae.set_threshold(theta)
    after = l0()
    record = {
        "source": "calibrated",
        "target_l0": target,
        "theta": theta,
        "store": str(store.path),
        "store_model": store.manifest.get("model"),
        "store_hook": hook,
        "store_corpus": store.manifest.get("corpus"),
        "n_tokens": n,
        "l0_before": before,
        "l0_after": after,
        "theta_before": theta_before,
        "previous": sae.theta_info,
    }
    sae.set_threshold(theta, record)
    return record


def calibrate_folder(
    sae_dir: str | Path,
    store,
    target_l0: float | None = None,
    n_tokens: int | None = None,
    batch_size: int = 4096,
    hook: str | None = None,
    allow_mismatch: bool = False,
) -> dict:
    """calibrate() an SAE folder and write the new theta (and its record in cfg.json) back,
    atomically (the folder is checked writable first)."""
    from .plumbing.files import prepare_output

    sae = load_sae(sae_dir)
    prepare_output(sae_dir, 0, "SAE folder")
    record = calibrate(sae, store, target_l0, n_tokens, batch_size, hook, allow_mismatch)
    sae.save(sae_dir)
    return record
