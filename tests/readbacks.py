"""A test helper: the saekit lines that make the host wait for the device, seen on any device."""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _saekit_line() -> str:
    frames = [f for f in traceback.extract_stack() if "/saekit/" in f.filename]
    return (
        f"{frames[-1].filename.split('/saekit/')[-1]}:{frames[-1].lineno} {frames[-1].line}"
        if frames
        else "?"
    )


class DispatchReadBacks(TorchDispatchMode):
    """Where torch dispatches each operator: a value read back (item, bool, float) or an output
    whose size depends on the data (nonzero, a boolean-mask index). The stand-in on any device for
    CUDA's sync debug mode; a .tolist() is not dispatched, so the Trainer's one deliberate
    read-back per step is not listed."""

    WAITS = {
        "_local_scalar_dense",
        "nonzero",
        "is_nonzero",
        "equal",
        "masked_select",
        "unique",
        "_unique2",
        "unique_consecutive",
        "bincount",
    }

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        # operators that compute (views and detach excluded): a GPU's kernel launches
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.kernels += not (
            func.is_view
            or name in ("detach", "_record_function_enter_new", "_record_function_exit")
        )
        masks = name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for t in (args[1] if len(args) > 1 else ()) or ()
        )
        if (
            name in self.WAITS
            or masks
            or (name == "repeat_interleave" and not (kwargs or {}).get("output_size"))
        ):
            self.found.append(f"{name}: {_saekit_line()}")
        return func(*args, **(kwargs or {}))
