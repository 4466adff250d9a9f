"""Activations: capture them from a model into a resumable on-disk store (capture.py), and read them
back as shuffled batches (store.py, which also documents the folder layout; manifest.py reads its
manifest); formats.py opens a saekit store or a SAELens cache, export.py writes the latter."""

from .capture import capture, capture_splits, capture_throughput, forward_hooks
from .export import export_store
from .formats import (
    FORMATS,
    SAELensCache,
    open_store,
    saekit_hook_name,
    saelens_hook_name,
    store_format,
)
from .store import DTYPES, FORMAT, ActivationStore, StoreError

__all__ = [
    "capture",
    "capture_splits",
    "capture_throughput",
    "forward_hooks",
    "DTYPES",
    "FORMAT",
    "ActivationStore",
    "StoreError",
    "FORMATS",
    "SAELensCache",
    "export_store",
    "open_store",
    "saekit_hook_name",
    "saelens_hook_name",
    "store_format",
]
