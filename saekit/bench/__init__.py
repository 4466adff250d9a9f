"""SAEBench's evaluations, run offline on the embedded model and the bundled corpus, written in
SAEBench's own output format (the sae-bench 0.6.0 wheel's schemas).

    output.py      the output document every evaluation writes, and where it is filed
    core.py        core: reconstruction, shrinkage, sparsity, density, loss and KL, weight geometry
    letters.py     the first-letter words, prompts and their cached activations
    probes.py      SAEBench's linear, L1-ranked and k-sparse probes
    absorption.py  first-letter feature absorption
    tasks.py       sparse probing's tasks on the bundled corpus, and their cached contexts
    probing.py     sparse probing
    summary.py     one table over several SAEs, with bootstrap intervals; paired differences
    toy.py         absorption where the truth is known: a hierarchy and two hand-built SAEs
    run.py         bench(): every evaluation for several SAEs on one model (`saekit bench`)
"""

from .absorption import AbsorptionConfig, absorption_eval, word_absorption
from .core import CoreConfig, core_eval
from .letters import LetterData, letter_data
from .output import EVAL_TYPES, BenchError, eval_output, output_path, write_output
from .probing import ProbingConfig, sparse_probing_eval
from .run import EVALS, bench, load_results, parse_evals, read_all
from .summary import absorbed_l0, format_table, summary_table
from .tasks import TASKS, ProbingData, probing_data
from .toy import AbsorptionToy, absorption_toy

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
    "AbsorptionToy",
    "absorbed_l0",
    "absorption_eval",
    "absorption_toy",
    "bench",
    "core_eval",
    "eval_output",
    "format_table",
    "letter_data",
    "load_results",
    "output_path",
    "parse_evals",
    "probing_data",
    "read_all",
    "sparse_probing_eval",
    "summary_table",
    "word_absorption",
    "write_output",
]
