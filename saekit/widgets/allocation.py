"""Latents per token: on typed text (AllocationExplorer) and on toy data (ToyAllocationExplorer)."""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch

from .. import analysis, viz
from .base import Responsive

DEFAULT_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune."
)


class AllocationExplorer(Responsive):
    """Type or pick a text, pick an SAE, slide its threshold (BatchTopK, JumpReLU-style) or k
    (TopK), and watch the per-token latent counts change. The text is read when you leave the box
    (or press Shift+Enter), not on every key; the colour scale stays fixed while a slider moves, so
    darker always means more latents; the trained θ (or k) is marked on the slider and `reset` goes
    back to it.

    Click a token in the heat-map (or call `select_token(position)`) to list its active latents with
    their activation and share of the reconstruction; each opens in the FeatureExplorer given for
    that SAE in `feature_explorers` ({SAE name: FeatureExplorer})."""

    def __init__(
        self,
        saes: dict,
        model,
        texts: dict | None = None,
        hook: str | None = None,
        width: int = 16,
        feature_explorers: dict | None = None,
    ):
        self.saes, self.model, self.width = saes, model, width
        self.feature_explorers = feature_explorers or {}
        self._init_log()
        self.hook = hook or next(iter(saes.values())).cfg.hook_name
        self.texts = texts or {"Hamlet": DEFAULT_TEXT}
        self._controls()
        self.figure = go.FigureWidget(
            viz.token_counts_figure({"": self._empty_table()}, width=width)
        )
        self._acts, self._z = None, None
        self.token_info = W.HTML("<i>click a token to list its active latents</i>")
        self.token_buttons = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.figure.data[0].on_click(self.guard(self._on_click))
        self._configure_sliders()
        self._load_text()
        self._wire()
        self.widget = W.VBox(
            [
                W.HBox([self.preset, self.sae_choice]),
                self.text,
                W.HBox([self.threshold, self.reset]),
                self.k,
                self.summary,
                self.figure,
                self.token_info,
                self.token_buttons,
                self.log,
            ]
        )

    def _controls(self) -> None:
        """The text, the SAE and its sparsity setting (θ or k)."""
        texts = self.texts
        self.preset = W.Dropdown(options=list(texts) + ["(type your own)"], description="text")
        self.text = W.Textarea(
            value=next(iter(texts.values())),
            continuous_update=False,
            layout=W.Layout(width="100%", height="70px"),
        )
        self.reset = W.Button(description="reset", tooltip="back to the trained θ / k")
        self.sae_choice = W.Dropdown(options=list(self.saes), description="SAE")
        self.threshold = W.FloatSlider(
            description="threshold θ",
            min=0.0,
            max=1.0,
            step=0.005,
            readout_format=".3f",
            continuous_update=False,
            layout=W.Layout(width="60%"),
        )
        self.k = W.IntSlider(
            description="k", min=1, max=128, continuous_update=False, layout=W.Layout(width="60%")
        )
        self.summary = W.HTML()

    def _wire(self) -> None:
        """Every control to what it changes."""
        self.preset.observe(self.guard(self._on_preset), "value")
        self.text.observe(self.guard(lambda _: self._load_text()), "value")
        self.sae_choice.observe(
            self.guard(lambda _: (self._configure_sliders(), self.refresh())), "value"
        )
        self.threshold.observe(self.guard(lambda _: self.refresh()), "value")
        self.k.observe(self.guard(lambda _: self.refresh()), "value")
        self.reset.on_click(self.guard(lambda _: self._configure_sliders()))

    @staticmethod
    def _empty_table():
        import pandas as pd

        return pd.DataFrame(
            {"position": [0], "token": [""], "count": [0], "kept": [False], "top_latents": [[]]}
        )

    @property
    def sae(self):
        return self.saes[self.sae_choice.value]

    def _configure_sliders(self) -> None:
        sae = self.sae
        thr = sae.inference_threshold()
        use_k = sae.per_token_k
        self.k.layout.display = None if use_k else "none"
        self.threshold.layout.display = "none" if use_k else None
        if use_k:
            self.k.max = max(128, 4 * sae.cfg.k)
            self.k.value = sae.cfg.k
            self.k.description = f"k (trained {sae.cfg.k})"
        else:
            theta = float(thr.mean()) if thr is not None else 0.0
            self.threshold.max = max(1.0, 4 * theta)
            self.threshold.value = theta
            self.threshold.description = f"θ (trained {theta:.3f})"
        # one colour scale per SAE, fixed while its slider moves: counts above it show
        # as the darkest colour
        self.zmax = 3 * sae.cfg.k if sae.has_k else None

    def _on_preset(self, change) -> None:
        if change["new"] in self.texts:
            self.text.value = self.texts[change["new"]]

    def _load_text(self) -> None:
        self._acts, self._tokens, self._kept = analysis.text_activations(
            self.model, self.text.value or " ", self.hook
        )
        self.refresh()

    def table(self):
        """The current per-token table (what the figure shows)."""
        sae = self.sae
        if sae.per_token_k:
            z = analysis.codes_with(sae, self._acts, k=int(self.k.value))
        elif sae.inference_threshold() is not None:
            z = analysis.codes_with(sae, self._acts, threshold=float(self.threshold.value))
        else:
            z = analysis.codes_with(sae, self._acts)
        self._z = z * torch.from_numpy(self._kept)[:, None].to(z.device)
        return analysis.count_table(z, self._tokens, self._kept)

    def _on_click(self, trace, points, state=None) -> None:
        if points.xs:
            self.select_token(int(points.ys[0]) * self.width + int(points.xs[0]))

    def select_token(self, position: int):
        """The token's active latents (analysis.token_latents) as a table and as buttons that
        open each latent."""
        t = analysis.token_latents(self.sae, self._z[position])
        fx = self.feature_explorers.get(self.sae_choice.value)
        self.token_info.value = (
            f"<b>{self._tokens[position]!r}</b> (position {position}): {len(t)} active latents"
            + ("" if fx else " &middot; <i>pass feature_explorers= to open them</i>")
        )
        buttons = []
        for r in t.head(16).itertuples():
            b = W.Button(
                description=f"#{r.latent} {r.activation:.2f} ({r.share:.0%})",
                layout=W.Layout(width="auto"),
                tooltip=f"activation {r.activation:.3f}, {r.share:.1%} of the reconstruction",
                disabled=fx is None,
            )
            if fx is not None:
                b.on_click(self.guard(lambda _, j=int(r.latent): setattr(fx.latent, "value", j)))
            buttons.append(b)
        self.token_buttons.children = buttons
        return t

    def refresh(self) -> None:
        if self._acts is None:
            return
        t = self.table()
        # no k: three times the mean count at the SAE's own setting, fixed from then on
        if self.zmax is None:
            self.zmax = max(1, int(3 * t[t.kept]["count"].mean()))
        new = viz.token_counts_figure({self.sae_choice.value: t}, width=self.width, zmax=self.zmax)
        with self.figure.batch_update():
            self.figure.data[0].z = new.data[0].z
            self.figure.data[0].text = new.data[0].text
            self.figure.data[0].hovertext = new.data[0].hovertext
            self.figure.data[0].zmax = new.data[0].zmax
            self.figure.layout.height = new.layout.height
            self.figure.layout.title.text = f"Active latents per token: {self.sae_choice.value}"
        kept = t[t.kept]
        self.token_info.value, self.token_buttons.children = (
            "<i>click a token to list its active latents</i>",
            (),
        )
        self.summary.value = (
            f"<b>{len(kept)}</b> tokens, mean <b>{kept['count'].mean():.1f}</b> active latents "
            f"(min {kept['count'].min()}, max {kept['count'].max()})"
        )


class ToyAllocationExplorer(Responsive):
    """Toy data: slide TopK's k and BatchTopK's threshold and see how each sample's latent count
    tracks its true number of active features."""

    def __init__(self, saes: dict, x, true_counts):

        self.saes, self.x, self.true = saes, torch.as_tensor(x).float(), np.asarray(true_counts)
        self._init_log()
        self.sliders = {}
        for name, sae in saes.items():
            if sae.per_token_k:
                s = W.IntSlider(
                    value=sae.cfg.k,
                    min=1,
                    max=4 * sae.cfg.k,
                    description=f"{name}: k",
                    continuous_update=False,
                    style={"description_width": "initial"},
                )
            else:
                thr = sae.inference_threshold()
                theta = float(thr.mean()) if thr is not None else 0.0
                s = W.FloatSlider(
                    value=theta,
                    min=0.0,
                    max=max(1.0, 3 * theta),
                    step=0.01,
                    readout_format=".2f",
                    description=f"{name}: θ",
                    continuous_update=False,
                    style={"description_width": "initial"},
                )
            s.observe(self.guard(lambda _: self.refresh()), "value")
            self.sliders[name] = s
        self.figure = go.FigureWidget(viz.count_vs_truth_figure(self.true, self.counts()))
        self.widget = W.VBox([*self.sliders.values(), self.figure, self.log])

    def counts(self) -> dict:
        out = {}
        for name, sae in self.saes.items():
            s = self.sliders[name]
            z = (
                analysis.codes_with(sae, self.x, k=int(s.value))
                if sae.per_token_k
                else analysis.codes_with(sae, self.x, threshold=float(s.value))
            )
            out[name] = (z != 0).sum(-1).cpu().numpy()
        return out

    def refresh(self) -> None:
        new = viz.count_vs_truth_figure(self.true, self.counts())
        with self.figure.batch_update():
            for old, tr in zip(self.figure.data, new.data):
                old.y, old.name = tr.y, tr.name
                if tr.error_y is not None:
                    old.error_y = tr.error_y
