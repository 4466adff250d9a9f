"""SAE files of the ecosystem, read and written as plain dicts and tensors (no SAE objects here).

- SAELens: `cfg.json` + `sae_weights.safetensors`. saekit writes SAELens's inference layout (a
  BatchTopK SAE as a `jumprelu` with one threshold everywhere, as SAELens saves it), so
  `sae_lens.SAE.load_from_disk` reads our folders; our own fields ride along under "saekit". Reading
  takes the inference layout (`standard`, `topk`, `jumprelu`; a `jumprelu` saved from a BatchTopK or
  Matryoshka BatchTopK training SAE comes back as one) and the training layout (`batchtopk`,
  `matryoshka_batchtopk`, `topk` with `rescale_acts_by_decoder_norm`, `jumprelu` with
  `log_threshold`).
- sparsify: `cfg.json` (its own keys) + `sae.safetensors`, TopK only, both ways.

Whatever a format does outside our encoder (decoder-norm rescaling, `apply_b_dec_to_input=False`, a
dataset-wide input scale) is folded into the weights exactly, so the SAE on the other side gives the
same code and reconstruction. Each architecture's names in these formats are facts of its class
(`saelens_name`, `saelens_training_name`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ..plumbing.checks import whole_number
from ..plumbing.version import saekit_version
from .config import ARCHITECTURES, SAEConfig, SAEConfigError, architecture

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens (and saekit)
SPARSIFY_WEIGHTS = "sae.safetensors"


# -- SAELens ---------------------------------------------------------------------------------------


def to_saelens(
    cfg: SAEConfig,
    weights: dict[str, torch.Tensor],
    input_scale: float | None = None,
    theta_info: dict | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """SAELens's cfg.json and tensors for an SAE's config and weights (`SAE.weights()`). A
    dataset-wide input scale (normalize="dataset") is folded into the weights, so the files need
    no extra step."""
    cls = architecture(cfg.arch)
    s = input_scale if cfg.normalize == "dataset" and input_scale is not None else 1.0
    state = dict(weights)
    state.update(
        W_enc=(weights["W_enc"] * s).contiguous(),
        W_dec=(weights["W_dec"] / s).contiguous(),
        b_dec=(weights["b_dec"] / s).contiguous(),
    )
    widths = list(itertools.accumulate(cfg.group_sizes)) if cls.has_prefixes else None
    out = {
        "architecture": cls.saelens_name,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if cfg.normalize == "token" else "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "context_size": cfg.context_size,
            "dataset_path": cfg.dataset,
            "prepend_bos": True,
            "model_class_name": "saekit",
            "training_architecture": cls.saelens_training_name,
            "training_architecture_details": {"k": cfg.k}
            | ({"matryoshka_widths": widths} if widths else {}),
        },
        "saekit": {
            **cfg.to_dict(),
            "version": saekit_version(),
            "input_scale_folded": input_scale if cfg.normalize == "dataset" else None,
            "theta": theta_info,
        },
    }
    if cls.saelens_name == "topk":
        out["k"] = cfg.k
    if widths:  # SAELens's training config name for the nested boundaries
        out["matryoshka_widths"] = widths
    return out, state


def saekit_config(raw: dict) -> SAEConfig:
    """The config saekit wrote under "saekit" (a dataset-wide scale is already folded into the
    weights)."""
    ours = raw["saekit"]
    return SAEConfig.from_dict(
        {
            **ours,
            "normalize": "none"
            if ours.get("normalize") == "dataset"
            else ours.get("normalize", "none"),
        }
    )


def _fold_decoder_norm(state: dict) -> None:
    """SAELens's rescale_acts_by_decoder_norm (select on pre * |W_dec row|, decode with z / |row|)
    as plain weights: the same code and reconstruction."""
    n = state["W_dec"].norm(dim=-1)
    state["W_enc"] = state["W_enc"] * n
    state["b_enc"] = state["b_enc"] * n
    state["W_dec"] = state["W_dec"] / n[:, None]


def _groups_from_widths(widths, d_sae: int) -> list[int]:
    widths = [int(w) for w in widths]
    if not widths or widths[-1] != d_sae:
        widths.append(d_sae)
    return [b - a for a, b in zip([0] + widths[:-1], widths)]


def saelens_names() -> dict[str, str]:
    """SAELens architecture name -> saekit architecture, from the registered classes' training names
    (which include every inference name; a `jumprelu` file saved from a BatchTopK SAE is told
    apart in from_saelens)."""
    return {cls.saelens_training_name: name for name, cls in ARCHITECTURES.items()}


def _supported(raw: dict, known: dict, where: Path) -> tuple[str, str]:
    """A SAELens cfg.json's architecture and input normalisation, where saekit can load them."""
    arch = raw.get("architecture", "standard")
    if arch not in known:
        raise SAEConfigError(
            f"{where}: SAELens architecture '{arch}' is not supported; saekit loads "
            f"{', '.join(known)}"
        )
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", "layer_norm"):
        raise SAEConfigError(
            f"{where}: normalize_activations='{norm}' is not supported "
            f"(saekit loads 'none' and 'layer_norm'); fold the scaling into the weights first"
        )
    if raw.get("reshape_activations", "none") != "none":
        raise SAEConfigError(
            f"{where}: reshape_activations='{raw['reshape_activations']}' (attention hook_z SAEs) "
            f"is not supported; saekit SAEs read flat [tokens, d_in] activations"
        )
    return arch, norm


def from_saelens(raw: dict, state: dict, where: Path) -> tuple[SAEConfig, dict]:
    """saekit config + weights for a SAELens cfg.json and state dict (any supported layout)."""
    known = saelens_names()
    arch, norm = _supported(raw, known, where)
    meta = raw.get("metadata") or {}
    details = meta.get("training_architecture_details") or {}
    state = dict(state)
    if "topk_threshold" in state:  # training layout of (Matryoshka) BatchTopK: one global threshold
        state["threshold"] = (
            state.pop("topk_threshold").reshape(()).expand(state["b_enc"].shape).clone()
        )
    if "log_threshold" in state:  # training layout of JumpReLU
        state["threshold"] = state.pop("log_threshold").exp()
    if raw.get("rescale_acts_by_decoder_norm", False):
        _fold_decoder_norm(state)
    if not raw.get("apply_b_dec_to_input", True):
        # SAELens: pre = x W_enc + b_enc; ours: pre = (x - b_dec) W_enc + b_enc'
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    d_in, d_sae = (int(n) for n in state["W_enc"].shape)
    k = _whole_field(raw.get("k", details.get("k", 32)), "k", where)
    widths = raw.get("matryoshka_widths") or details.get("matryoshka_widths")
    thr = state.get("threshold")
    ours = known[arch]
    trained_as = known.get(meta.get("training_architecture"))
    if (
        trained_as
        and architecture(trained_as).has_theta
        and architecture(trained_as).saelens_name == arch
        and thr is not None
        and bool((thr == thr.flatten()[0]).all())
    ):
        # SAELens saves a BatchTopK SAE as a JumpReLU with one threshold everywhere
        ours = trained_as
    prefixes = architecture(ours).has_prefixes
    cfg = SAEConfig(
        arch=ours,
        d_in=d_in,
        d_sae=d_sae,
        k=max(1, min(k, d_sae - 1)),
        normalize="token" if norm == "layer_norm" else "none",
        group_sizes=_groups_from_widths(widths, d_sae) if prefixes and widths else None,
        hook_name=meta.get("hook_name") or raw.get("hook_name"),
        model_name=meta.get("model_name") or raw.get("model_name"),
        context_size=meta.get("context_size"),
        dataset=meta.get("dataset_path"),
    )
    return cfg, state


def _whole_field(value, name: str, where: Path) -> int:
    """A whole-number field of another tool's cfg.json, or an error naming it."""
    whole = whole_number(value)
    if whole is None:
        raise SAEConfigError(f"{where}: field '{name}' is {value!r}; expected a whole number")
    return whole


# -- sparsify --------------------------------------------------------------------------------------


def from_sparsify(raw: dict, state: dict, where: Path) -> tuple[SAEConfig, dict]:
    """saekit TopK config + weights for a sparsify `cfg.json` and `sae.safetensors`."""
    if raw.get("activation", "topk") != "topk":
        raise SAEConfigError(
            f"{where}: sparsify activation '{raw.get('activation')}' is not supported; "
            f"saekit loads sparsify's 'topk' sparse coders"
        )
    if raw.get("transcode") or raw.get("skip_connection") or "W_skip" in state:
        raise SAEConfigError(
            f"{where}: this sparsify checkpoint is a transcoder or has a skip connection; "
            f"saekit loads sparse autoencoders (transcode=false, skip_connection=false)"
        )
    if "encoder.weight" not in state or "W_dec" not in state:
        raise SAEConfigError(
            f"{where}: a sparsify checkpoint needs 'encoder.weight' and 'W_dec' tensors "
            f"(has {sorted(state)}); was it saved with decoder=False?"
        )
    enc = state["encoder.weight"]  # [num_latents, d_in]
    d_sae, d_in = (int(n) for n in enc.shape)
    if "d_in" in raw and int(raw["d_in"]) != d_in:
        raise SAEConfigError(
            f"{where}: cfg.json says d_in={raw['d_in']} but encoder.weight is {tuple(enc.shape)}"
        )
    new = {
        "W_enc": enc.t().contiguous(),
        "b_enc": state["encoder.bias"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    k = _whole_field(raw.get("k", 32), "k", where)
    cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k, normalize="none")
    return cfg, new


def to_sparsify(
    cfg: SAEConfig, weights: dict[str, torch.Tensor], input_scale: float | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """sparsify's cfg.json and tensors for a TopK SAE (`sparsify.SparseCoder.load_from_disk` reads
    them). sparsify has no input normalisation: a dataset-wide scale is folded in; per-token
    normalisation cannot be expressed."""
    cls = architecture(cfg.arch)
    if not cls.per_token_k:
        raise SAEConfigError(
            f"sparsify's sparse coders take exactly k latents per token; a {cls.label} SAE does "
            "not (its code would change). Export a TopK SAE, or use the SAELens format"
        )
    if cfg.normalize == "token":
        raise SAEConfigError(
            "sparsify has no per-token input normalisation; this SAE was trained with "
            "normalize='token'. Use the SAELens format (its 'layer_norm') instead"
        )
    s = input_scale if cfg.normalize == "dataset" and input_scale is not None else 1.0
    raw = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
        "normalize_decoder": True,
        "num_latents": cfg.d_sae,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }
    state = {
        "encoder.weight": (weights["W_enc"] * s).t().contiguous(),
        "encoder.bias": weights["b_enc"].contiguous(),
        "W_dec": (weights["W_dec"] / s).contiguous(),
        "b_dec": (weights["b_dec"] / s).contiguous(),
    }
    return raw, state
