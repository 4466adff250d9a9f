"""An SAE and the data it is put on, checked against each other, and activations checked finite.

Every command and API that puts an SAE on a store or a model (eval, calibrate, report, sweep,
analysis, the widgets and the course) asks here which hook to read. The answer is the SAE's own
hook, or the one asked for, and it must be in the data: there is never a fallback to another hook. A
store or model other than the SAE's is an error naming both sides, unless the caller asks for that
cross-use on purpose (`allow_mismatch=True`, `--allow-mismatch`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

CROSS_USE = "pass allow_mismatch=True (--allow-mismatch) to use them together on purpose"


def whole_number(value) -> int | None:
    """`value` as an int where it is a whole number (4608 or 4608.0; never a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


def is_number(value) -> bool:
    """A finite int or float (never a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class DataMismatchError(ValueError):
    """An SAE put on activations of another hook, model or width."""


class NonFiniteError(ValueError):
    """Activations with NaN or inf values."""


def _hook(name: str | None) -> str | None:
    """A hook name in saekit's spelling (SAELens's `blocks.L.hook_resid_post` is `resid_post.L`)."""
    from ..models import saekit_hook_name

    return saekit_hook_name(name) if name else None


def _model(name: str | None) -> str:
    """A model name as compared: its last path part, lower case; the embedded model by any of its
    names."""
    from ..models import EMBEDDED_ALIASES, EMBEDDED_MODEL

    name = (name or "").strip().lower()
    if name in EMBEDDED_ALIASES:
        name = EMBEDDED_MODEL.lower()
    return name.rstrip("/").rsplit("/", 1)[-1]


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model names name one model (unknown names match anything). SAELens names
    TransformerLens models (gpt2-small); their transformers ids (gpt2) are tried too."""
    if not a or not b or a == "unknown" or b == "unknown" or _model(a) == _model(b):
        return True
    from ..models import transformers_name

    return _model(transformers_name(a)) == _model(transformers_name(b))


def hook_on_store(sae, store, hook: str | None = None, allow_mismatch: bool = False) -> str:
    """The hook of `store` that `sae` (an SAE or its SAEConfig) reads: `hook` if given, else the
    SAE's own (or the store's only one where the SAE does not say). It must be in the store, the
    SAE's width must fit, and unless allow_mismatch the hook and the store's model must be the
    SAE's."""
    cfg = getattr(sae, "cfg", sae)
    sae_hook = _hook(cfg.hook_name)
    wanted = _hook(hook) or sae_hook
    where = f"store {store.path}"
    if wanted is None:
        if len(store.hooks) != 1:
            raise DataMismatchError(
                f"the SAE does not record its hook and {where} holds {store.hooks}; "
                f"name the one to read with hook= (--hook)"
            )
        wanted = store.hooks[0]
    if wanted not in store.hooks:
        asked = "the hook asked for" if hook else "the SAE's hook"
        raise DataMismatchError(
            f"{where} has no activations at {asked} '{wanted}' (it holds {store.hooks}); "
            f"capture that hook, or choose a store that has it"
        )
    if not allow_mismatch:
        if sae_hook is not None and wanted != sae_hook:
            raise DataMismatchError(
                f"the SAE was trained at '{sae_hook}' but the hook "
                f"asked for is '{wanted}'; {CROSS_USE}"
            )
        store_model = store.manifest.get("model")
        if not same_model(cfg.model_name, store_model):
            raise DataMismatchError(
                f"the SAE was trained on model '{cfg.model_name}' but {where} holds activations "
                f"of '{store_model}'; use a store of that model, or {CROSS_USE}"
            )
    if cfg.d_in != store.d_model:
        raise DataMismatchError(
            f"the SAE reads d_in={cfg.d_in} but {where} holds d={store.d_model} at '{wanted}'; "
            f"use a store captured where the SAE was trained"
        )
    return wanted


def hook_on_model(sae, model, hook: str | None = None, allow_mismatch: bool = False) -> str:
    """The hook of `model` that `sae` reads (as hook_on_store, for activations the model
    computes)."""
    from ..models import model_name, resolve_hook

    sae_hook = _hook(sae.cfg.hook_name)
    wanted = _hook(hook) or sae_hook
    if wanted is None:
        raise DataMismatchError(
            "the SAE does not record its hook; name the one to read with hook= (--hook)"
        )
    resolve_hook(model, wanted)  # an unknown hook point is a HookPointError naming the valid ones
    if not allow_mismatch:
        if sae_hook is not None and wanted != sae_hook:
            raise DataMismatchError(
                f"the SAE was trained at '{sae_hook}' but the hook "
                f"asked for is '{wanted}'; {CROSS_USE}"
            )
        if not same_model(sae.cfg.model_name, model_name(model)):
            raise DataMismatchError(
                f"the SAE was trained on model '{sae.cfg.model_name}' but the model given is "
                f"'{model_name(model)}'; load that model, or {CROSS_USE}"
            )
    return wanted


def one_hook(hooks: set[str]) -> str:
    """The one hook several SAEs read together (evaluate_many), or an error naming the different
    ones."""
    if len(hooks) != 1:
        raise DataMismatchError(
            f"these SAEs read different hooks ({', '.join(sorted(hooks))}); evaluate them "
            f"one hook at a time"
        )
    return next(iter(hooks))


def require_finite(
    x: torch.Tensor, store=None, rows: np.ndarray | int | None = None, what: str = ""
) -> None:
    """Raise NonFiniteError if `x` [B, d] has a NaN or inf, naming the first bad row: its shard and
    row in `store` when the store-order indices of x's rows are given (an array, or the first row
    of a contiguous run)."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    i = int(bad.any(-1).nonzero()[0, 0])
    if store is not None and rows is not None:
        row = int(rows + i) if np.isscalar(rows) else int(np.asarray(rows)[i])
        shard, in_shard = store.locate(row)
        place = f"store {store.path}, shard {shard:05d}, row {in_shard} (row {row} of the store)"
        fix = "re-capture the store (capture refuses such rows) or remove that shard"
    else:
        place, fix = f"row {i} of {what or 'the activations'}", "check the model and the input"
    raise NonFiniteError(f"NaN/inf activations at {place}; {fix}")
