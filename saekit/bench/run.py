"""`saekit bench`: SAEBench's evaluations of several SAEs on one model, on the embedded model and
the bundled corpus by default. The model is loaded once; SAEs at one hook share its activations,
its clean forwards and the first-letter prompts; the prompts' activations are cached under the
output folder; a result already written is read back instead of computed again."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..plumbing.files import local_path, prepare_output, refuse_overlap
from .output import EVAL_TYPES, BenchError, output_path, sae_name, write_output

EVALS = tuple(EVAL_TYPES)


def parse_evals(text: str) -> list[str]:
    """ "core,absorption" -> ["core", "absorption"], naming any unknown evaluation."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in EVAL_TYPES]
    if unknown or not names:
        raise BenchError(
            f"unknown evaluation {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(EVALS)}, comma-separated"
        )
    return names


def bench(
    sae_dirs: list[str | Path],
    evals: list[str] | tuple[str, ...] = EVALS,
    model_name: str | None = None,
    out: str | Path = "runs/bench",
    corpus: str | None = None,
    cache: str | Path | None = None,
    overwrite: bool = False,
    allow_mismatch: bool = False,
    progress: bool = True,
    core_config=None,
    absorption_config=None,
    probing_config=None,
) -> pd.DataFrame:
    """Run `evals` on every SAE folder and write SAEBench's JSON under `out`
    (OUT/<eval_type_id>/<sae folder name>_eval_results.json); the summary table, one row per
    SAE, with 95% intervals where the evaluation has them. Captured activations are cached in
    `cache` (default OUT/cache)."""
    from ..models import load_model
    from ..plumbing.checks import hook_on_model
    from ..sae import load_sae

    evals = list(evals)
    for name in evals:
        parse_evals(name)
    inputs = {f"SAE folder {i + 1}": d for i, d in enumerate(sae_dirs)}
    inputs.update({"corpus": local_path(corpus), "model": local_path(model_name)})
    refuse_overlap(out, inputs, "bench output folder")
    out = prepare_output(out, what="bench output folder")
    cache = Path(cache) if cache is not None else out / "cache"
    saes = {str(d): load_sae(d) for d in sae_dirs}
    names = [sae_name(sae, d) for d, sae in saes.items()]
    if len(set(names)) < len(names):
        raise BenchError(
            f"two SAE folders share a name ({', '.join(names)}); their results would be filed "
            "over each other: give them folders with different names"
        )
    model = load_model(model_name)
    for sae in saes.values():  # a wrong model or hook fails here, before any work
        hook_on_model(sae, model, allow_mismatch=allow_mismatch)
    todo = {
        e: [(d, sae) for d, sae in saes.items() if overwrite or not _done(out, e, d, sae)]
        for e in evals
    }
    if todo.get("core"):
        _run_core(todo["core"], model, out, corpus, core_config, progress)
    if todo.get("absorption"):
        _run_absorption(todo["absorption"], model, out, cache, absorption_config, progress)
    if todo.get("sparse-probing"):
        _run_probing(todo["sparse-probing"], model, out, cache, corpus, probing_config, progress)
    from .summary import summary_table

    return summary_table(load_results(out, list(saes), evals))


def _done(out: Path, eval: str, folder, sae) -> bool:
    return output_path(out, eval, sae_name(sae, folder)).exists()


def load_results(out: str | Path, sae_dirs, evals=None) -> dict[str, dict]:
    """The results bench() wrote: {SAE folder name: {evaluation: SAEBench document}}, for
    `evals` (None: every evaluation that has a result)."""
    results = {}
    for folder in sae_dirs:
        name = Path(folder).name
        paths = {e: output_path(out, e, name) for e in (evals or EVALS)}
        results[name] = {
            e: json.loads(p.read_text()) for e, p in paths.items() if evals or p.exists()
        }
    return results


def read_all(out: str | Path) -> dict[str, dict]:
    """Every result under a bench output folder: {SAE name: {evaluation: document}} (an SAE has
    the evaluations that were run on it)."""
    results: dict[str, dict] = {}
    suffix = "_eval_results.json"
    for eval, type_id in EVAL_TYPES.items():
        for path in sorted((Path(out) / type_id).glob(f"*{suffix}")):
            results.setdefault(path.name[: -len(suffix)], {})[eval] = json.loads(path.read_text())
    return results


def _by_hook(items):
    groups: dict[str, list] = {}
    for folder, sae in items:
        groups.setdefault(sae.cfg.hook_name, []).append((folder, sae))
    return groups


def _run_core(items, model, out, corpus, config, progress) -> None:
    from ..data import packed_corpus
    from ..models import model_name
    from .core import CoreConfig, core_eval

    cfg = config or CoreConfig(model_name=model_name(model))
    n_seq = cfg.batch_size_prompts * max(
        cfg.n_eval_reconstruction_batches, cfg.n_eval_sparsity_variance_batches
    )
    packed = packed_corpus(
        model.tokenizer, corpus, split="test", seq_len=cfg.context_size,
        max_tokens=n_seq * cfg.context_size,
    )  # fmt: skip
    for group in _by_hook(items).values():
        docs = core_eval([s for _, s in group], model, packed.tokens, packed.keep, cfg, progress)
        for (folder, sae), doc in zip(group, docs):
            doc["eval_config"]["dataset"] = corpus or "bundled"
            write_output(out, "core", sae_name(sae, folder), doc)


def _run_absorption(items, model, out, cache, config, progress) -> None:
    from ..models import model_name
    from .absorption import AbsorptionConfig, absorption_eval
    from .letters import letter_data

    cfg = config or AbsorptionConfig(model_name=model_name(model))
    for hook, group in _by_hook(items).items():
        data = letter_data(
            model, hook, max_words=cfg.max_words, min_per_letter=cfg.min_words_per_letter,
            seed=cfg.random_seed, batch_size=cfg.llm_batch_size, cache=cache,
            progress=progress,
        )  # fmt: skip
        if data.skipped and progress:
            print(f"absorption: letters skipped for too few single-token words: {data.skipped}")
        for folder, sae in group:
            doc = absorption_eval(sae, data, cfg, progress)
            write_output(out, "absorption", sae_name(sae, folder), doc)


def _run_probing(items, model, out, cache, corpus, config, progress) -> None:
    from ..models import model_name
    from .probing import ProbingConfig, sparse_probing_eval
    from .tasks import probing_data

    cfg = config or ProbingConfig(model_name=model_name(model))
    for hook, group in _by_hook(items).items():
        data = probing_data(model, hook, corpus, cfg, cache=cache, progress=progress)
        for folder, sae in group:
            doc = sparse_probing_eval(sae, data, cfg, progress)
            write_output(out, "sparse-probing", sae_name(sae, folder), doc)
