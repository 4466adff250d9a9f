"""Interop with the peers: SAELens and sparsify files and objects, and SAELens's pretrained releases.

saekit writes SAELens's inference layout (see `SAE.save`), so `sae_lens.SAE.load_from_disk` reads our
folders directly. This module reads the other direction:

- SAELens folders in the inference layout (`standard`, `topk`, `jumprelu`; a `jumprelu` that SAELens
  saved from a BatchTopK or Matryoshka BatchTopK training SAE comes back as our BatchTopK/Matryoshka)
  and in the training layout (`save_model` of a training SAE: `batchtopk`, `matryoshka_batchtopk`,
  `topk` with `rescale_acts_by_decoder_norm`, `jumprelu` with `log_threshold`).
- sparsify checkpoints (`cfg.json` with its own keys + `sae.safetensors`) as a TopK SAE.
- `load("release/sae_id")`: a pretrained SAE from SAELens's directory, downloaded from the hub.

Whatever a format does outside our encoder (decoder-norm rescaling, `apply_b_dec_to_input=False`) is
folded into the weights exactly, so the loaded SAE gives the peer's code and reconstruction.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .sae import SAE, SAEConfig, SAEConfigError, load_sae

SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_ARCHS = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")


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


def from_saelens(raw: dict, state: dict, where: Path) -> tuple[SAEConfig, dict]:
    """saekit config + weights for a SAELens cfg.json and state dict (any supported layout)."""
    arch = raw.get("architecture", "standard")
    if arch not in SAELENS_ARCHS:
        raise SAEConfigError(f"{where}: SAELens architecture '{arch}' is not supported; saekit loads "
                             f"{', '.join(SAELENS_ARCHS)}")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", "layer_norm"):
        raise SAEConfigError(f"{where}: normalize_activations='{norm}' is not supported "
                             f"(saekit loads 'none' and 'layer_norm'); fold the scaling into the weights first")
    if raw.get("reshape_activations", "none") != "none":
        raise SAEConfigError(f"{where}: reshape_activations='{raw['reshape_activations']}' (attention hook_z SAEs) "
                             f"is not supported; saekit SAEs read flat [tokens, d_in] activations")
    meta = raw.get("metadata") or {}
    details = meta.get("training_architecture_details") or {}
    state = dict(state)
    if "topk_threshold" in state:  # training layout of (Matryoshka) BatchTopK: one global threshold
        state["threshold"] = state.pop("topk_threshold").reshape(()).expand(state["b_enc"].shape).clone()
    if "log_threshold" in state:  # training layout of JumpReLU
        state["threshold"] = state.pop("log_threshold").exp()
    if raw.get("rescale_acts_by_decoder_norm", False):
        _fold_decoder_norm(state)
    if not raw.get("apply_b_dec_to_input", True):
        # SAELens: pre = x W_enc + b_enc; ours: pre = (x - b_dec) W_enc + b_enc'
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    d_in, d_sae = (int(n) for n in state["W_enc"].shape)
    k = raw.get("k", details.get("k", 32))
    widths = raw.get("matryoshka_widths") or details.get("matryoshka_widths")
    thr = state.get("threshold")
    trained_as = meta.get("training_architecture")
    if arch == "jumprelu" and trained_as in ("batchtopk", "matryoshka_batchtopk") and thr is not None \
            and bool((thr == thr.flatten()[0]).all()):
        arch = trained_as  # SAELens saves a BatchTopK SAE as a JumpReLU with one threshold everywhere
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
            "matryoshka_batchtopk": "matryoshka"}[arch]
    cfg = SAEConfig(arch=ours, d_in=d_in, d_sae=d_sae, k=max(1, min(int(round(float(k))), d_sae - 1)),
                    normalize="token" if norm == "layer_norm" else "none",
                    group_sizes=_groups_from_widths(widths, d_sae) if ours == "matryoshka" and widths else None,
                    hook_name=meta.get("hook_name") or raw.get("hook_name"),
                    model_name=meta.get("model_name") or raw.get("model_name"),
                    context_size=meta.get("context_size"), dataset=meta.get("dataset_path"))
    return cfg, state


def from_sparsify(raw: dict, state: dict, where: Path) -> tuple[SAEConfig, dict]:
    """saekit TopK config + weights for a sparsify `cfg.json` and `sae.safetensors`."""
    if raw.get("activation", "topk") != "topk":
        raise SAEConfigError(f"{where}: sparsify activation '{raw.get('activation')}' is not supported; "
                             f"saekit loads sparsify's 'topk' sparse coders")
    if raw.get("transcode") or raw.get("skip_connection") or "W_skip" in state:
        raise SAEConfigError(f"{where}: this sparsify checkpoint is a transcoder or has a skip connection; "
                             f"saekit loads sparse autoencoders (transcode=false, skip_connection=false)")
    if "encoder.weight" not in state or "W_dec" not in state:
        raise SAEConfigError(f"{where}: a sparsify checkpoint needs 'encoder.weight' and 'W_dec' tensors "
                             f"(has {sorted(state)}); was it saved with decoder=False?")
    enc = state["encoder.weight"]  # [num_latents, d_in]
    d_sae, d_in = (int(n) for n in enc.shape)
    if "d_in" in raw and int(raw["d_in"]) != d_in:
        raise SAEConfigError(f"{where}: cfg.json says d_in={raw['d_in']} but encoder.weight is {tuple(enc.shape)}")
    new = {"W_enc": enc.t().contiguous(), "b_enc": state["encoder.bias"], "W_dec": state["W_dec"],
           "b_dec": state["b_dec"]}
    cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=int(raw.get("k", 32)), normalize="none")
    return cfg, new


# -- live objects --------------------------------------------------------------------------------------

def to_saelens(sae: SAE):
    """The same SAE as a `sae_lens.SAE` (through SAELens's own loader of our folder)."""
    from sae_lens import SAE as SAELensSAE

    with tempfile.TemporaryDirectory() as d:
        sae.save(d)
        return SAELensSAE.load_from_disk(d, device=str(sae.W_enc.device))


def from_saelens_sae(sl) -> SAE:
    """A saekit SAE from a live `sae_lens.SAE` or `TrainingSAE` (inference weights, folded)."""
    with tempfile.TemporaryDirectory() as d:
        if hasattr(sl, "save_inference_model"):
            sl.save_inference_model(d)
        else:
            sl.save_model(d)
        return load_sae(d)


def from_sparsify_coder(coder) -> SAE:
    """A saekit TopK SAE from a live `sparsify.SparseCoder`."""
    with tempfile.TemporaryDirectory() as d:
        coder.save_to_disk(d)
        return load_sae(d)


# -- pretrained releases ----------------------------------------------------------------------------------

def _is_network_error(e: BaseException) -> bool:
    mods = ("huggingface_hub", "requests", "httpx", "httpcore", "urllib3", "socket")
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or any(
        type(c).__module__.split(".")[0] in mods for c in (e, e.__cause__, e.__context__) if c is not None)


def load(spec: str | Path, sae_id: str | None = None, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE: a local folder (saekit, SAELens or sparsify), or a SAELens pretrained release as
    `load("release/sae_id")` / `load("release", "sae_id")`, downloaded from the Hugging Face hub."""
    path = Path(spec)
    if sae_id is None and path.exists():
        return load_sae(path, device)
    spec = str(spec)
    if sae_id is None:
        if "/" not in spec:
            raise SAEConfigError(f"'{spec}' is neither an SAE folder nor 'release/sae_id' (a SAELens pretrained "
                                 f"release, e.g. 'gpt2-small-res-jb/blocks.8.hook_resid_pre')")
        release, sae_id = spec.split("/", 1)
    else:
        release = spec
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise SAEConfigError("pretrained releases are looked up in SAELens's directory; install it with "
                             "pip install 'saekit[peers]'") from e
    try:
        sl = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except ValueError as e:
        raise SAEConfigError(f"SAELens has no pretrained SAE '{release}' / '{sae_id}': {e}") from e
    except Exception as e:  # noqa: BLE001 - which exception a failed download raises depends on the HTTP stack
        if _is_network_error(e):
            raise SAEConfigError(
                f"cannot download the pretrained SAE '{release}/{sae_id}': the Hugging Face hub is not reachable "
                f"from here ({type(e).__name__}: {str(e)[:200]}). Load it where the hub is reachable (it is then "
                f"cached), or download its folder and pass the folder's path to saekit.load") from e
        raise
    return from_saelens_sae(sl).to(device)

