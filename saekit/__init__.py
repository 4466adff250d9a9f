"""saekit: train, evaluate and explore BatchTopK sparse autoencoders on language-model
activations."""

from .plumbing.version import saekit_version

__version__ = saekit_version()


def __getattr__(name):  # saekit.load(...) without importing torch for `saekit --help`
    if name == "load":
        from .interop import load

        return load
    raise AttributeError(f"module 'saekit' has no attribute '{name}'")
