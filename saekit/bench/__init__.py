"""SAEBench's evaluations, run offline on the embedded model and the bundled corpus, written in
SAEBench's own output format (the sae-bench 0.6.0 wheel's schemas).

    output.py      the output document every evaluation writes, and where it is filed
    core.py        core: reconstruction, shrinkage, sparsity, density, loss and KL, weight geometry
    letters.py     the first-letter words, prompts and their cached activations
    probes.py      SAEBench's linear, L1-ranked and k-sparse probes
    absorption.py  first-letter feature absorption
    tasks.py       sparse probing's tasks on the bundled corpus, and their cached contexts
    probing.py     sparse probing
    summary.py     one table over several SAEs, with bootstrap intervals
    run.py         bench(): every evaluation for several SAEs on one model (`saekit bench`)
"""

from .absorption import AbsorptionConfig, absorption_eval, word_absorption
from .core import CoreConfig, core_eval
from .letters import LetterData, letter_data
from .output import EVAL_TYPES, BenchError, eval_output, output_path, write_output
from .probing import ProbingConfig, sparse_probing_eval
from .run import EVALS, bench, parse_evals
from .summary import format_table, summary_table
from .tasks import TASKS, ProbingData, probing_data

__all__ = [
    "EVALS",
    "EVAL_TYPES",
    "TASKS",
    "AbsorptionConfig",
    "BenchError",
    "CoreConfig",
    "LetterData",
    "ProbingConfig",
    "ProbingData",
    "absorption_eval",
    "bench",
    "core_eval",
    "eval_output",
    "format_table",
    "letter_data",
    "output_path",
    "parse_evals",
    "probing_data",
    "sparse_probing_eval",
    "summary_table",
    "word_absorption",
    "write_output",
]
