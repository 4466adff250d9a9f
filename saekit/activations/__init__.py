"""Activations: capture them from a model into a resumable on-disk store (capture.py), and read them back as
shuffled batches (store.py, which also documents the folder layout)."""
from .capture import capture, capture_splits, capture_throughput, forward_hooks
from .store import DTYPES, FORMAT, ActivationStore, StoreError

__all__ = ["capture", "capture_splits", "capture_throughput", "forward_hooks", "DTYPES", "FORMAT", "ActivationStore",
           "StoreError"]
