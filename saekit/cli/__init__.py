"""The `saekit` command line: capture / train / eval / calibrate / compare / sweep / sweep-report /
report / demo / export-store / notebooks, each a thin command (commands.py) over the library.
Every choice and default comes from the library's own objects (SAEConfig, TrainConfig, the
architecture registry, the functions' signatures), so the command line and the Python API cannot
drift apart."""

from __future__ import annotations

import sys

from .args import default_of, enc_init_norm_arg
from .parser import build_parser as _build_parser

__all__ = ["build_parser", "main", "enc_init_norm_arg", "default_of"]


def build_parser():
    """The parser of every command (parser.py), described by this package's first line."""
    return _build_parser(__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> int:
    """Run one command; a problem with its input or output is a one-line message and exit code 2,
    never a traceback (argparse gives its own errors the same code). Ctrl-C ends it with one line
    saying what was kept, and exit code 130."""
    args = build_parser().parse_args(argv)
    from ..activations import StoreError
    from ..bench import BenchError
    from ..data import CorpusError
    from ..metrics import EvaluationError
    from ..models import DeviceError, HookPointError, ModelLoadError, check_device
    from ..plumbing.checks import DataMismatchError, NonFiniteError
    from ..plumbing.files import OutputError, os_error_message
    from ..plumbing.locks import LockError
    from ..sae import SAEConfigError
    from ..train import TrainingError

    try:
        # a device this machine cannot use is told before anything is made, used or not
        check_device(getattr(args, "device", None))
        return args.fn(args)
    except KeyboardInterrupt:
        from .interrupts import interrupted

        print(f"\nsaekit {args.cmd}: {interrupted(args)}", file=sys.stderr)
        return 130
    except (
        DeviceError,
        BenchError,
        StoreError,
        CorpusError,
        HookPointError,
        ModelLoadError,
        SAEConfigError,
        TrainingError,
        OutputError,
        LockError,
        DataMismatchError,
        NonFiniteError,
        EvaluationError,
        FileExistsError,
    ) as e:
        message = str(e)
    except OSError as e:  # disk full, no permission, a file gone: what and where, not a traceback
        message = os_error_message(e)
    print(f"saekit {args.cmd}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
