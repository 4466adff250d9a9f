"""SAE folders on disk: `load_sae` reads saekit's own, SAELens's (inference or training layout) and
sparsify's; `SAE.save` writes SAELens's layout and `save_sparsify` sparsify's."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..plumbing.checks import is_number, whole_number
from ..plumbing.files import atomic_write_bytes, atomic_write_json, read_json_object
from . import formats
from .architectures import make_sae
from .base import SAE
from .config import SAEConfigError


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder: saekit's or SAELens's (`cfg.json` + `sae_weights.safetensors`, inference
    or training layout) or sparsify's (`cfg.json` + `sae.safetensors`). Every field and tensor is
    checked before the SAE is made."""
    folder = Path(folder)
    cfg_path = folder / formats.CFG_FILE
    sparsify = (folder / formats.SPARSIFY_WEIGHTS).exists() and not (
        folder / formats.WEIGHTS_FILE
    ).exists()
    w_path = folder / (formats.SPARSIFY_WEIGHTS if sparsify else formats.WEIGHTS_FILE)
    if not cfg_path.exists() or not w_path.exists():
        raise SAEConfigError(
            f"{folder} is not an SAE folder: it needs {formats.CFG_FILE} and "
            f"{formats.WEIGHTS_FILE} (saekit/SAELens) or {formats.SPARSIFY_WEIGHTS} (sparsify)"
        )
    raw = read_json_object(cfg_path, SAEConfigError, "restore it or save the SAE again")
    try:
        state = load_file(str(w_path))
    except Exception as e:
        raise SAEConfigError(
            f"{w_path} is corrupt or truncated ({e.__class__.__name__}: {e})"
        ) from e
    check_tensors(state, w_path)
    cfg, state = _config(raw, {k: v.float() for k, v in state.items()}, cfg_path, w_path, sparsify)
    check_shapes(cfg, state, cfg_path, w_path)
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.set_weights(state)
        if raw.get("saekit"):
            sae.theta_info = raw["saekit"].get("theta")
        if sae.inference_threshold() is not None:
            if state.get("threshold") is None:
                raise SAEConfigError(
                    f"{w_path}: a {sae.label} SAE needs a 'threshold' tensor for inference"
                )
            sae.load_threshold(state["threshold"])
    return sae.to(device).eval()


def _config(raw: dict, state: dict, cfg_path: Path, w_path: Path, sparsify: bool):
    """(SAEConfig, weights in saekit's layout) from whichever tool wrote the folder; a field that
    is missing or of the wrong kind is an SAEConfigError naming the file."""
    try:
        if sparsify:
            return formats.from_sparsify(raw, state, w_path)
        if raw.get("saekit"):
            check_theta_record(raw["saekit"].get("theta"), f"{cfg_path}: saekit.theta")
            return formats.saekit_config(raw), state
        return formats.from_saelens(raw, state, cfg_path)
    except SAEConfigError as e:
        if str(e).startswith(str(cfg_path.parent)):
            raise
        raise SAEConfigError(f"{cfg_path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SAEConfigError(
            f"{cfg_path} is malformed ({e.__class__.__name__}: "
            f"{e}); restore it or save the SAE again"
        ) from e


def check_shapes(cfg, state: dict, cfg_path: Path, w_path: Path) -> None:
    """The four tensors there, of the shapes cfg.json implies."""
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in state:
            raise SAEConfigError(
                f"{w_path} has no '{key}' tensor (has {sorted(state)}); not an SAE weights file"
            )
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_in,),
    }
    wrong = [
        f"{k} is {tuple(state[k].shape)}, not {want}"
        for k, want in shapes.items()
        if tuple(state[k].shape) != want
    ]
    if wrong:
        raise SAEConfigError(
            f"{w_path} does not fit {cfg_path} (d_in={cfg.d_in}, d_sae={cfg.d_sae}): "
            f"{'; '.join(wrong)}; the weights and the config come from different SAEs"
        )


def check_tensors(state: dict[str, torch.Tensor], where: Path) -> None:
    """Weights as an SAE needs them: floating point (an int8 file cast to float would be nonsense)
    and finite, each fault named with its tensor."""
    for name, t in state.items():
        if not t.is_floating_point():
            raise SAEConfigError(
                f"{where}: tensor '{name}' is {str(t.dtype).removeprefix('torch.')}; SAE weights "
                "must be floating point (float32, float16 or bfloat16). Save the SAE again"
            )
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise SAEConfigError(
                f"{where}: tensor '{name}' holds {bad:,} NaN or infinite value(s); the SAE "
                "diverged or the file is damaged. Retrain it or restore the file"
            )


# fields of a theta record (cfg.json's saekit.theta) and what each must be
_THETA_NUMBERS = (
    "theta",
    "running_estimate",
    "final_estimate",
    "target_l0",
    "l0_before",
    "l0_after",
    "theta_before",
)
_THETA_COUNTS = ("final_estimate_batches", "n_tokens")
THETA_SOURCES = ("training", "calibrated")


def check_theta_record(record, where: str) -> None:
    """A theta record as training and calibrate write it: null, or an object whose source is known
    and whose figures are numbers (its `previous` record likewise)."""
    if record is None:
        return
    if not isinstance(record, dict):
        raise SAEConfigError(
            f"{where} is {record!r}; expected an object (the record of where theta came from) or "
            "null. Calibrate the SAE again or set it to null"
        )
    wrong = []
    if record.get("source") not in THETA_SOURCES:
        wrong.append(f"source is {record.get('source')!r}, expected one of {THETA_SOURCES}")
    for key in _THETA_NUMBERS + _THETA_COUNTS:
        v = record.get(key)
        ok = v is None or (
            whole_number(v) is not None and v >= 0 if key in _THETA_COUNTS else is_number(v)
        )
        if not ok:
            what = "a whole number of 0 or more" if key in _THETA_COUNTS else "a finite number"
            wrong.append(f"{key} is {v!r}, expected {what} or null")
    if wrong:
        raise SAEConfigError(
            f"{where}: {'; '.join(wrong)}. Calibrate the SAE again or set the record to null"
        )
    check_theta_record(record.get("previous"), f"{where}.previous")


def save_sparsify(sae: SAE, folder: str | Path) -> Path:
    """Write a TopK SAE as a sparsify checkpoint (cfg.json + sae.safetensors) that sparsify
    loads."""
    scale = float(sae.input_scale) if sae.cfg.normalize == "dataset" else None
    raw, state = formats.to_sparsify(sae.cfg, sae.weights(), input_scale=scale)
    folder = Path(folder)
    atomic_write_bytes(
        folder / formats.SPARSIFY_WEIGHTS,
        lambda fh: fh.write(safetensors_bytes(state, metadata={"format": "pt"})),
    )
    atomic_write_json(folder / formats.CFG_FILE, raw)
    return folder
