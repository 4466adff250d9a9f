"""One latent's dashboard: FeatureExplorer."""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch

from .. import analysis, viz
from .base import Responsive


class FeatureExplorer(Responsive):
    """Browse latents by index, by density or by search over their examples; shows top and
    quantile examples, the activation histogram, logit effects and decoder neighbours."""

    def __init__(self, index: analysis.FeatureIndex, sae, model=None):
        self.index, self.sae, self.model = index, sae, model
        self._init_log()
        self._browse_controls()
        self._probe_controls()
        self.hist = go.FigureWidget(viz.activation_histogram_figure([], 0))
        self.density = go.FigureWidget(viz.density_histogram_figure(index.density))
        self.logits = go.FigureWidget(
            viz.logit_effects_figure({"promoted": [], "suppressed": []}, 0)
        )
        self._wire()
        self.widget = self._layout()
        alive = np.nonzero(index.density > 0)[0]
        self.latent.value = int(alive[0]) if len(alive) else 0
        self.show()

    def _browse_controls(self) -> None:
        """Choosing a latent: order, index, prev/next, search and its matches, the context."""
        index, model = self.index, self.model
        self.order = W.Dropdown(
            options=["index", "density (high first)", "density (low first)"], description="order"
        )
        self.latent = W.BoundedIntText(
            min=0, max=index.d_sae - 1, description="latent", continuous_update=False
        )
        self.prev, self.next = W.Button(description="◀ prev"), W.Button(description="next ▶")
        self.search = W.Text(placeholder="a word…", description="search", continuous_update=False)
        self.search_in = W.Dropdown(
            options=["example tokens", "example contexts"]
            + (["promoted tokens"] if model is not None else []),
            description="in",
        )
        # decoder-cosine and co-activation neighbours: click one to open it
        self.neighbour_buttons = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self._promoted = None
        self.results = W.Select(options=[], rows=5, description="matches")
        self.info = W.HTML()
        self.examples = W.HTML()
        # the context window of every example: tokens before and after the one it fires on
        self.before = W.BoundedIntText(
            value=24,
            min=0,
            max=256,
            description="before",
            continuous_update=False,
            layout=W.Layout(width="150px"),
        )
        self.after = W.BoundedIntText(
            value=8,
            min=0,
            max=256,
            description="after",
            continuous_update=False,
            layout=W.Layout(width="150px"),
        )

    def _probe_controls(self) -> None:
        """Testing a hypothesis: type text, see this latent on every token; then ablate or steer it
        and watch the next-token distribution move (analysis.causal_effect)."""
        model = self.model
        self.probe = W.Text(
            placeholder="type text, Enter: this latent on every token",
            description="try",
            continuous_update=False,
            disabled=model is None,
            layout=W.Layout(width="70%"),
        )
        self.probe_out = W.HTML()
        self.edit = W.ToggleButtons(options=["ablate", "steer"], disabled=model is None)
        self.strength = W.FloatText(
            value=5.0, description="by", layout=W.Layout(width="160px"), disabled=model is None
        )
        self.run_edit = W.Button(description="edit and compare", disabled=model is None)
        self.edit_out = W.HTML()

    def _wire(self) -> None:
        """Every control to what it changes."""
        self.latent.observe(self.guard(lambda _: self.show()), "value")
        self.before.observe(self.guard(lambda _: self.show()), "value")
        self.after.observe(self.guard(lambda _: self.show()), "value")
        self.prev.on_click(self.guard(lambda _: self.step(-1)))
        self.next.on_click(self.guard(lambda _: self.step(+1)))
        self.search.observe(self.guard(lambda _: self.run_search()), "value")
        # a new field reruns the search
        self.search_in.observe(self.guard(lambda _: self.run_search()), "value")
        self.probe.observe(self.guard(lambda _: self.try_text()), "value")
        self.run_edit.on_click(self.guard(lambda _: self.try_edit()))
        self.results.observe(
            self.guard(
                lambda c: c["new"] is not None and setattr(self.latent, "value", int(c["new"]))
            ),
            "value",
        )

    def _layout(self) -> W.VBox:
        return W.VBox(
            [
                W.HBox([self.order, self.latent, self.prev, self.next]),
                W.HBox([self.search, self.search_in, self.results]),
                self.info,
                self.neighbour_buttons,
                W.HBox([W.HTML("<b>context:</b>&nbsp;"), self.before, self.after]),
                self.examples,
                W.HBox([self.hist, self.density]),
                self.logits,
                self.probe,
                self.probe_out,
                W.HBox([self.edit, self.strength, self.run_edit]),
                self.edit_out,
                self.log,
            ]
        )

    def _sequence(self) -> np.ndarray:
        if self.order.value == "index":
            return np.arange(self.index.d_sae)
        d = self.index.density
        return (
            np.argsort(-d, kind="stable")
            if "high" in self.order.value
            else np.argsort(d, kind="stable")
        )

    def step(self, delta: int) -> None:
        seq = list(self._sequence())
        i = seq.index(self.latent.value)
        self.latent.value = int(seq[(i + delta) % len(seq)])

    def run_search(self) -> None:
        """Search the current field for the current query (both boxes act on Enter or when left)."""
        query = self.search.value
        if not query:
            hits = []
        elif self.search_in.value == "promoted tokens":
            if self._promoted is None:  # computed once, on first use
                self._promoted = analysis.top_promoted(self.sae, self.model, progress=True)
            hits = analysis.search_promoted(self._promoted, self.model.tokenizer, query)
        else:
            hits = self.index.search_text(
                query, where="context" if self.search_in.value == "example contexts" else "token"
            )
        self.results.options = [(f"#{h} ({self.index.density[h]:.2%})", h) for h in hits]

    def try_text(self) -> None:
        """The current latent on every token of the typed text (hover a token for its value)."""
        if not self.probe.value:
            self.probe_out.value = ""
            return
        t = analysis.latent_on_text(self.sae, self.model, self.probe.value, int(self.latent.value))
        top = float(self.index.activations(int(self.latent.value))[1].max(initial=0)) or None
        self.probe_out.value = (
            viz.token_shading_html(t["token"][1:], t["activation"][1:], top)
            + f"<small>max here {t['activation'].max():.3f}; shading relative to the latent's "
            f"top activation in the index</small>"
        )

    def try_edit(self) -> None:
        """Ablate or steer the current latent on the typed text; the next-token change beside the
        clean run."""
        steer = None if self.edit.value == "ablate" else float(self.strength.value)
        effect = analysis.causal_effect(
            self.sae, self.model, self.probe.value or " ", int(self.latent.value), steer
        )
        self.edit_out.value = viz.causal_html(effect)

    def show(self) -> None:
        lat = int(self.latent.value)
        _, vals = self.index.activations(lat)
        dens = float(self.index.density[lat])
        buttons = []
        for kind, pairs in (
            ("decoder cosine", self.index.neighbours(lat)),
            ("fire together", self.index.coactivation_neighbours(lat)),
        ):
            buttons.append(W.HTML(f"<b>{kind}:</b>&nbsp;"))
            for j, c in pairs:
                b = W.Button(
                    description=f"#{j} ({c:.2f})",
                    layout=W.Layout(width="auto"),
                    tooltip=f"open latent {j}",
                )
                b.on_click(self.guard(lambda _, j=j: setattr(self.latent, "value", j)))
                buttons.append(b)
        self.neighbour_buttons.children = buttons
        neigh = ", ".join(f"#{j} ({c:.2f})" for j, c in self.index.neighbours(lat))
        group = ""
        if self.sae.has_prefixes:  # Matryoshka: which nested level the latent belongs to
            g = int(self.sae.group_of(torch.tensor([lat]))[0])
            group = f" &middot; nested group <b>{g + 1}</b> of {len(self.sae.cfg.group_sizes)}"
        self.info.value = (
            f"<h3>Latent {lat}{group}</h3>fires on <b>{dens:.3%}</b> of "
            f"{self.index.n_tokens:,} tokens; max activation "
            f"{vals.max() if len(vals) else 0:.3f}<br>nearest by decoder cosine: {neigh}"
        )
        top_value = vals.max() if len(vals) else None
        groups = viz.quantile_groups_html(
            self.index.quantile_groups(lat, window=self.before.value, after=self.after.value),
            top_value,
        )
        self.examples.value = (
            "<h4>Top activations</h4>"
            + viz.examples_html(
                self.index.top_examples(lat, 20, window=self.before.value, after=self.after.value)
            )
            + "<h4>Across its range (quantile groups)</h4>"
            + groups
        )
        h = viz.activation_histogram_figure(vals, lat, dens)
        with self.hist.batch_update():
            self.hist.data[0].x = h.data[0].x
            self.hist.layout.title = h.layout.title
        d = viz.density_histogram_figure(self.index.density, lat)
        with self.density.batch_update():
            self.density.layout.shapes, self.density.layout.annotations = (
                d.layout.shapes,
                d.layout.annotations,
            )
        if self.model is not None:
            lf = viz.logit_effects_figure(analysis.logit_effects(self.sae, self.model, lat), lat)
            with self.logits.batch_update():
                for i in range(3):
                    self.logits.data[i].x, self.logits.data[i].y = lf.data[i].x, lf.data[i].y
                self.logits.layout.title = lf.layout.title
            if self.probe.value:
                self.try_text()
