"""Training runs: the frontier of a sweep (FrontierExplorer) and live training curves
(TrainingMonitor)."""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go

from .. import viz
from .base import Responsive


class FrontierExplorer(Responsive):
    """Interactive frontier from a sweep DataFrame; click (or select) a run to see its per-token
    L0."""

    def __init__(self, df, per_token_l0: dict | None = None):
        self.df = df.reset_index(drop=True)
        self._init_log()
        self.per_token_l0 = per_token_l0 or {}
        self.figure = go.FigureWidget(viz.frontier_figure(self.df))
        self.detail = go.FigureWidget(viz.l0_distribution_figure({}, title="click a run"))
        self.selected = W.HTML("<i>click a point to see that run's per-token L0</i>")
        for trace in self.figure.data:
            trace.on_click(self.guard(self._on_click))
        self.widget = W.VBox([self.figure, self.selected, self.detail, self.log])

    def _on_click(self, trace, points, state=None) -> None:
        if points.point_inds:
            self.select(trace.customdata[points.point_inds[0]])

    def select(self, name: str) -> None:
        row = self.df[self.df["name"] == name].iloc[0]
        self.selected.value = f"<b>{name}</b>: L0 {row['l0']:.1f}, NMSE {row['nmse']:.4f}" + (
            f", CE recovered {row['ce_recovered']:.4f}"
            if "ce_recovered" in row and row["ce_recovered"] == row["ce_recovered"]
            else ""
        )
        if name in self.per_token_l0:
            f = viz.l0_distribution_figure(
                {name: self.per_token_l0[name]}, title=f"Per-token L0 of {name}"
            )
            with self.detail.batch_update():
                self.detail.data = []
                self.detail.add_traces(f.data)
                self.detail.layout.title = f.layout.title


class TrainingMonitor:
    """Live training curves (loss, NMSE, L0, dead fraction) for `train(..., callback=monitor)`."""

    PANELS = tuple(key for key, _ in viz.TRAINING_PANELS)

    def __init__(self, names: list[str] | None = None, every: int = 5):
        self.every = every
        self.figure = go.FigureWidget(viz.training_curves_figure({}, title="training", height=320))
        self.names = names
        self.widget = self.figure

    def __call__(self, trainer, stats) -> None:
        if trainer.step % self.every and trainer.step != trainer.tc.total_steps:
            return
        names = self.names or trainer.names
        if not self.figure.data:
            for i, name in enumerate(names):
                for p, _ in enumerate(self.PANELS, start=1):
                    self.figure.add_scatter(
                        x=[],
                        y=[],
                        mode="lines",
                        name=name,
                        legendgroup=name,
                        showlegend=(p == 1),
                        line=dict(color=trainer.saes[i].color),
                        row=1,
                        col=p,
                    )
                sae = trainer.saes[i]
                if sae.l0_target:  # the L0 the architecture aims at, for the eye
                    self.figure.add_hline(
                        y=sae.l0_target, line_dash="dash", line_color=sae.color, row=1, col=3
                    )
        with self.figure.batch_update():
            for i, s in enumerate(stats):
                for p, key in enumerate(self.PANELS):
                    tr = self.figure.data[i * len(self.PANELS) + p]
                    tr.x = tuple(tr.x) + (s["tokens"],)
                    tr.y = tuple(tr.y) + (s[key],)

    def show_result(self, result) -> None:
        """After train(): where no step ran live (the run was already trained and was reused), draw
        its saved training log, so the monitor shows the curves either way."""
        if self.figure.data:
            return
        names = self.names or result.names
        saved = viz.training_curves_figure(
            dict(zip(names, result.logs)), {n: s.l0_target for n, s in zip(names, result.saes)}
        )
        with self.figure.batch_update():
            self.figure.add_traces(
                list(saved.data),
                rows=[1] * len(saved.data),
                cols=[_panel(saved, t) for t in saved.data],
            )
            for shape in saved.layout.shapes:
                self.figure.add_shape(shape)


def _panel(fig, trace) -> int:
    """The subplot column (1-based) a trace of a one-row make_subplots figure sits in."""
    axis = trace.xaxis or "x"
    return int(axis[1:] or 1)
