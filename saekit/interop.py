"""Bridges to the peers' live objects, and SAELens's pretrained releases.

Files of either peer are read and written in `saekit.sae.formats` (plain dicts and tensors) and
`saekit.sae.folders` (`load_sae`, `SAE.save`, `save_sparsify`); this module turns live `sae_lens`
and `sparsify` objects into saekit SAEs and back through those files, and `load("release/sae_id")`
fetches a pretrained SAE from SAELens's directory on the Hugging Face hub.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .sae import SAE, SAEConfigError, load_sae, save_sparsify

# -- live objects ----------------------------------------------------------------------------------


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


def to_sparsify_coder(sae: SAE):
    """The same TopK SAE as a `sparsify.SparseCoder` (through sparsify's own loader of the files
    we write)."""
    from sparsify import SparseCoder

    with tempfile.TemporaryDirectory() as d:
        save_sparsify(sae, d)
        return SparseCoder.load_from_disk(d, device=str(sae.W_enc.device))


def from_sparsify_coder(coder) -> SAE:
    """A saekit TopK SAE from a live `sparsify.SparseCoder`."""
    with tempfile.TemporaryDirectory() as d:
        coder.save_to_disk(d)
        return load_sae(d)


# -- pretrained releases ---------------------------------------------------------------------------


def _is_network_error(e: BaseException) -> bool:
    mods = ("huggingface_hub", "requests", "httpx", "httpcore", "urllib3", "socket")
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or any(
        type(c).__module__.split(".")[0] in mods
        for c in (e, e.__cause__, e.__context__)
        if c is not None
    )


def load(spec: str | Path, sae_id: str | None = None, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE: a local folder (saekit, SAELens or sparsify), or a SAELens pretrained release as
    `load("release/sae_id")` / `load("release", "sae_id")`, downloaded from the Hugging Face hub."""
    path = Path(spec).expanduser()
    if sae_id is None and path.exists():
        return load_sae(path, device)
    if sae_id is None and str(spec).startswith(("/", ".", "~")):
        raise SAEConfigError(
            f"no SAE folder at {path}: give the folder of a saved SAE (saekit, SAELens or sparsify "
            f"files) or 'release/sae_id' for a SAELens pretrained release"
        )
    spec = str(spec)
    if sae_id is None:
        if "/" not in spec:
            raise SAEConfigError(
                f"'{spec}' is neither an SAE folder nor 'release/sae_id' (a SAELens pretrained "
                f"release, e.g. 'gpt2-small-res-jb/blocks.8.hook_resid_pre')"
            )
        release, sae_id = spec.split("/", 1)
    else:
        release = spec
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise SAEConfigError(
            "pretrained releases are looked up in SAELens's directory; install it with "
            "pip install 'saekit[peers]'"
        ) from e
    try:
        sl = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except ValueError as e:
        raise SAEConfigError(f"SAELens has no pretrained SAE '{release}' / '{sae_id}': {e}") from e
    except Exception as e:  # noqa: BLE001 - which exception a failed download raises depends on the HTTP stack
        if _is_network_error(e):
            raise SAEConfigError(
                f"cannot download the pretrained SAE '{release}/{sae_id}': the Hugging Face hub "
                "is not reachable "
                f"from here ({type(e).__name__}: {str(e)[:200]}). Load it where the hub is "
                "reachable (it is then "
                f"cached), or download its folder and pass the folder's path to saekit.load"
            ) from e
        raise
    return from_saelens_sae(sl).to(device)
