"""saekit's version, from the installed package's metadata: pyproject.toml is the one place it is
set. Modules read it here, not from the root package, which would put `saekit` itself in their
import chain."""

from importlib.metadata import PackageNotFoundError, version


def saekit_version() -> str:
    try:
        return version("saekit")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"
