"""What every explorer shares."""

from __future__ import annotations

import ipywidgets as W


class Responsive:
    """What every explorer shares: an output area (`log`) where its progress bars and errors appear,
    and callbacks that never fail silently: `guard(fn)` runs fn inside the log area and reports an
    exception there (and keeps it in `errors`) instead of letting ipywidgets swallow it."""

    def _init_log(self) -> None:
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto"))
        self.errors: list[BaseException] = []

    def guard(self, fn):
        def run(*args, **kwargs):
            with self.log:
                try:
                    return fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - shown to the user, kept for tests
                    self.errors.append(e)
                    self.log.append_stderr(f"{type(e).__name__}: {e}\n")

        return run
