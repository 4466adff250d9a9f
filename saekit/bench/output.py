"""SAEBench's output files: one JSON document per evaluation and SAE, in the shape of the
`eval_output_schema_*.json` files that the sae-bench 0.6.0 wheel ships, written atomically."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from ..plumbing.files import atomic_write_json, prepare_output
from ..sae import SAE
from ..sae.formats import to_saelens

# eval_type_id of each evaluation, as SAEBench names it (and the folder its files go to)
EVAL_TYPES = {
    "core": "core",
    "absorption": "absorption_first_letter",
    "sparse-probing": "sparse_probing",
}
# what goes where SAEBench records its own commit: these files were made by saekit
PRODUCER = "saekit"


class BenchError(ValueError):
    """A benchmark that cannot run on what it was given; the message says what to change."""


def sae_name(sae: SAE, folder: str | Path | None = None) -> str:
    """The name an SAE's results are filed under: its folder's name, else its label."""
    return Path(folder).name if folder is not None else sae.cfg.name


def sae_cfg_dict(sae: SAE) -> dict:
    """The SAE's configuration as SAELens writes it (SAEBench records the same dict)."""
    scale = float(sae.input_scale) if sae.cfg.normalize == "dataset" else None
    cfg, _ = to_saelens(sae.cfg, sae.weights(), input_scale=scale, theta_info=sae.theta_info)
    return cfg


def eval_output(
    eval: str,
    sae: SAE,
    config: dict,
    metrics: dict,
    details: list[dict],
    unstructured: dict | None = None,
) -> dict:
    """One SAEBench output document. `eval` is saekit's name for the evaluation (EVAL_TYPES)."""
    from .. import __version__

    return {
        "eval_type_id": EVAL_TYPES[eval],
        "eval_config": config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": f"{PRODUCER} {__version__}",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg_dict(sae),
        "eval_result_unstructured": unstructured,
    }


def output_path(out: str | Path, eval: str, name: str) -> Path:
    """Where SAEBench files one result: OUT/<eval_type_id>/<sae>_eval_results.json."""
    return Path(out) / EVAL_TYPES[eval] / f"{name}_eval_results.json"


def write_output(out: str | Path, eval: str, name: str, doc: dict) -> Path:
    """Write one result atomically (the output folder is checked first: a file there is an
    error that says so)."""
    folder = prepare_output(Path(out) / EVAL_TYPES[eval], what="bench output folder")
    path = folder / f"{name}_eval_results.json"
    atomic_write_json(path, doc)
    return path
