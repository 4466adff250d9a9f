"""ipywidgets explorers built on saekit.analysis and saekit.viz. Each has `.widget` to display and
methods/attributes that tests (and notebooks) can drive from Python."""
from __future__ import annotations

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import torch

from . import analysis, viz

class Responsive:
    """What every explorer shares: an output area (`log`) where its progress bars and errors appear, and callbacks
    that never fail silently: `guard(fn)` runs fn inside the log area and reports an exception there (and keeps it
    in `errors`) instead of letting ipywidgets swallow it."""

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


DEFAULT_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
                "the slings and arrows of outrageous fortune.")


class AllocationExplorer(Responsive):
    """Type or pick a text, pick an SAE, slide its threshold (BatchTopK, JumpReLU-style) or k (TopK),
    and watch the per-token latent counts change. The text is read when you leave the box (or press
    Shift+Enter), not on every key; the colour scale stays fixed while a slider moves, so darker always means
    more latents; the trained θ (or k) is marked on the slider and `reset` goes back to it."""

    def __init__(self, saes: dict, model, texts: dict | None = None, hook: str | None = None, width: int = 16):
        self.saes, self.model, self.width = saes, model, width
        self._init_log()
        self.hook = hook or next(iter(saes.values())).cfg.hook_name
        texts = texts or {"Hamlet": DEFAULT_TEXT}
        self.preset = W.Dropdown(options=list(texts) + ["(type your own)"], description="text")
        self.texts = texts
        self.text = W.Textarea(value=next(iter(texts.values())), continuous_update=False,
                               layout=W.Layout(width="100%", height="70px"))
        self.reset = W.Button(description="reset", tooltip="back to the trained θ / k")
        self.sae_choice = W.Dropdown(options=list(saes), description="SAE")
        self.threshold = W.FloatSlider(description="threshold θ", min=0.0, max=1.0, step=0.005, readout_format=".3f",
                                       continuous_update=False, layout=W.Layout(width="60%"))
        self.k = W.IntSlider(description="k", min=1, max=128, continuous_update=False, layout=W.Layout(width="60%"))
        self.summary = W.HTML()
        self.figure = go.FigureWidget(viz.token_counts_figure({"": self._empty_table()}, width=width))
        self._acts = None
        self._configure_sliders()
        self._load_text()
        self.preset.observe(self.guard(self._on_preset), "value")
        self.text.observe(self.guard(lambda _: self._load_text()), "value")
        self.sae_choice.observe(self.guard(lambda _: (self._configure_sliders(), self.refresh())), "value")
        self.threshold.observe(self.guard(lambda _: self.refresh()), "value")
        self.k.observe(self.guard(lambda _: self.refresh()), "value")
        self.reset.on_click(self.guard(lambda _: self._configure_sliders()))
        self.widget = W.VBox([W.HBox([self.preset, self.sae_choice]), self.text, W.HBox([self.threshold, self.reset]),
                              self.k, self.summary, self.figure, self.log])

    @staticmethod
    def _empty_table():
        import pandas as pd

        return pd.DataFrame({"position": [0], "token": [""], "count": [0], "kept": [False], "top_latents": [[]]})

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
        # one colour scale per SAE, fixed while its slider moves: counts above it show as the darkest colour
        self.zmax = 3 * sae.cfg.k if sae.has_k else None

    def _on_preset(self, change) -> None:
        if change["new"] in self.texts:
            self.text.value = self.texts[change["new"]]

    def _load_text(self) -> None:
        self._acts, self._tokens, self._kept = analysis.text_activations(self.model, self.text.value or " ", self.hook)
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
        return analysis.count_table(z, self._tokens, self._kept)

    def refresh(self) -> None:
        if self._acts is None:
            return
        t = self.table()
        if self.zmax is None:  # no k: three times the mean count at the SAE's own setting, fixed from then on
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
        self.summary.value = (f"<b>{len(kept)}</b> tokens, mean <b>{kept['count'].mean():.1f}</b> active latents "
                              f"(min {kept['count'].min()}, max {kept['count'].max()})")


class FeatureExplorer(Responsive):
    """Browse latents by index, by density or by search over their examples; shows top and
    quantile examples, the activation histogram, logit effects and decoder neighbours."""

    def __init__(self, index: analysis.FeatureIndex, sae, model=None):
        self.index, self.sae, self.model = index, sae, model
        self._init_log()
        self.order = W.Dropdown(options=["index", "density (high first)", "density (low first)"], description="order")
        self.latent = W.BoundedIntText(min=0, max=index.d_sae - 1, description="latent", continuous_update=False)
        self.prev, self.next = W.Button(description="◀ prev"), W.Button(description="next ▶")
        self.search = W.Text(placeholder="a word…", description="search", continuous_update=False)
        self.search_in = W.Dropdown(options=["example tokens", "example contexts"]
                                    + (["promoted tokens"] if model is not None else []), description="in")
        self.neighbour_buttons = W.HBox()  # decoder-cosine and co-activation neighbours: click one to open it
        self._promoted = None
        self.results = W.Select(options=[], rows=5, description="matches")
        self.info = W.HTML()
        self.examples = W.HTML()
        # test a hypothesis: type text, see this latent on every token; then ablate or steer it and watch the
        # next-token distribution move (analysis.causal_effect)
        self.probe = W.Text(placeholder="type text, Enter: this latent on every token", description="try",
                            continuous_update=False, disabled=model is None, layout=W.Layout(width="70%"))
        self.probe_out = W.HTML()
        self.edit = W.ToggleButtons(options=["ablate", "steer"], disabled=model is None)
        self.strength = W.FloatText(value=5.0, description="by", layout=W.Layout(width="160px"), disabled=model is None)
        self.run_edit = W.Button(description="edit and compare", disabled=model is None)
        self.edit_out = W.HTML()
        self.hist = go.FigureWidget(viz.activation_histogram_figure([], 0))
        self.density = go.FigureWidget(viz.density_histogram_figure(index.density))
        self.logits = go.FigureWidget(viz.logit_effects_figure({"promoted": [], "suppressed": []}, 0))
        self.latent.observe(self.guard(lambda _: self.show()), "value")
        self.prev.on_click(self.guard(lambda _: self.step(-1)))
        self.next.on_click(self.guard(lambda _: self.step(+1)))
        self.search.observe(self.guard(lambda _: self.run_search()), "value")
        self.search_in.observe(self.guard(lambda _: self.run_search()), "value")  # a new field reruns the search
        self.probe.observe(self.guard(lambda _: self.try_text()), "value")
        self.run_edit.on_click(self.guard(lambda _: self.try_edit()))
        self.results.observe(self.guard(lambda c: c["new"] is not None and setattr(self.latent, "value", int(c["new"]))),
                             "value")
        self.widget = W.VBox([W.HBox([self.order, self.latent, self.prev, self.next]),
                              W.HBox([self.search, self.search_in, self.results]), self.info,
                              self.neighbour_buttons, self.examples,
                              W.HBox([self.hist, self.density]), self.logits, self.probe, self.probe_out,
                              W.HBox([self.edit, self.strength, self.run_edit]), self.edit_out, self.log])
        alive = np.nonzero(index.density > 0)[0]
        self.latent.value = int(alive[0]) if len(alive) else 0
        self.show()

    def _sequence(self) -> np.ndarray:
        if self.order.value == "index":
            return np.arange(self.index.d_sae)
        d = self.index.density
        return np.argsort(-d, kind="stable") if "high" in self.order.value else np.argsort(d, kind="stable")

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
            hits = self.index.search_text(query, where="context" if self.search_in.value == "example contexts" else "token")
        self.results.options = [(f"#{h} ({self.index.density[h]:.2%})", h) for h in hits]

    def try_text(self) -> None:
        """The current latent on every token of the typed text (hover a token for its value)."""
        if not self.probe.value:
            self.probe_out.value = ""
            return
        t = analysis.latent_on_text(self.sae, self.model, self.probe.value, int(self.latent.value))
        top = float(self.index.activations(int(self.latent.value))[1].max(initial=0)) or None
        self.probe_out.value = (viz.token_shading_html(t["token"][1:], t["activation"][1:], top)
                                + f"<small>max here {t['activation'].max():.3f}; shading relative to the latent's "
                                  f"top activation in the index</small>")

    def try_edit(self) -> None:
        """Ablate or steer the current latent on the typed text; the next-token change beside the clean run."""
        steer = None if self.edit.value == "ablate" else float(self.strength.value)
        effect = analysis.causal_effect(self.sae, self.model, self.probe.value or " ", int(self.latent.value), steer)
        self.edit_out.value = viz.causal_html(effect)

    def show(self) -> None:
        lat = int(self.latent.value)
        _, vals = self.index.activations(lat)
        dens = float(self.index.density[lat])
        buttons = []
        for kind, pairs in (("decoder cosine", self.index.neighbours(lat)),
                            ("fire together", self.index.coactivation_neighbours(lat))):
            buttons.append(W.HTML(f"<b>{kind}:</b>&nbsp;"))
            for j, c in pairs:
                b = W.Button(description=f"#{j} ({c:.2f})", layout=W.Layout(width="auto"),
                             tooltip=f"open latent {j}")
                b.on_click(self.guard(lambda _, j=j: setattr(self.latent, "value", j)))
                buttons.append(b)
        self.neighbour_buttons.children = buttons
        neigh = ", ".join(f"#{j} ({c:.2f})" for j, c in self.index.neighbours(lat))
        group = ""
        if self.sae.has_prefixes:  # Matryoshka: which nested level the latent belongs to
            g = int(self.sae.group_of(torch.tensor([lat]))[0])
            group = f" &middot; nested group <b>{g + 1}</b> of {len(self.sae.cfg.group_sizes)}"
        self.info.value = (f"<h3>Latent {lat}{group}</h3>fires on <b>{dens:.3%}</b> of {self.index.n_tokens:,} tokens; "
                           f"max activation {vals.max() if len(vals) else 0:.3f}<br>nearest by decoder cosine: {neigh}")
        top_value = vals.max() if len(vals) else None
        groups = "".join(f"<h5>activation {g['range'][0]:.3f}–{g['range'][1]:.3f} &middot; {g['share']:.0%} of its "
                         f"firings</h5>" + viz.examples_html(g["examples"], top_value)
                         for g in self.index.quantile_groups(lat))
        self.examples.value = ("<h4>Top activations</h4>" + viz.examples_html(self.index.top_examples(lat, 20))
                               + "<h4>Across its range (quantile groups)</h4>" + groups)
        h = viz.activation_histogram_figure(vals, lat, dens)
        with self.hist.batch_update():
            self.hist.data[0].x = h.data[0].x
            self.hist.layout.title = h.layout.title
        d = viz.density_histogram_figure(self.index.density, lat)
        with self.density.batch_update():
            self.density.layout.shapes, self.density.layout.annotations = d.layout.shapes, d.layout.annotations
        if self.model is not None:
            lf = viz.logit_effects_figure(analysis.logit_effects(self.sae, self.model, lat), lat)
            with self.logits.batch_update():
                for i in range(3):
                    self.logits.data[i].x, self.logits.data[i].y = lf.data[i].x, lf.data[i].y
                self.logits.layout.title = lf.layout.title
            if self.probe.value:
                self.try_text()


class FrontierExplorer(Responsive):
    """Interactive frontier from a sweep DataFrame; click (or select) a run to see its per-token L0."""

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
        self.selected.value = (f"<b>{name}</b>: L0 {row['l0']:.1f}, NMSE {row['nmse']:.4f}"
                               + (f", CE recovered {row['ce_recovered']:.4f}" if "ce_recovered" in row and row["ce_recovered"] == row["ce_recovered"] else ""))
        if name in self.per_token_l0:
            f = viz.l0_distribution_figure({name: self.per_token_l0[name]}, title=f"Per-token L0 of {name}")
            with self.detail.batch_update():
                self.detail.data = []
                self.detail.add_traces(f.data)
                self.detail.layout.title = f.layout.title


class ToyAllocationExplorer(Responsive):
    """Toy data: slide TopK's k and BatchTopK's threshold and see how each sample's latent count
    tracks its true number of active features."""

    def __init__(self, saes: dict, x, true_counts):
        import torch

        self.saes, self.x, self.true = saes, torch.as_tensor(x).float(), np.asarray(true_counts)
        self._init_log()
        self.sliders = {}
        for name, sae in saes.items():
            if sae.per_token_k:
                s = W.IntSlider(value=sae.cfg.k, min=1, max=4 * sae.cfg.k, description=f"{name}: k",
                                continuous_update=False, style={"description_width": "initial"})
            else:
                thr = sae.inference_threshold()
                theta = float(thr.mean()) if thr is not None else 0.0
                s = W.FloatSlider(value=theta, min=0.0, max=max(1.0, 3 * theta), step=0.01, readout_format=".2f",
                                  description=f"{name}: θ", continuous_update=False,
                                  style={"description_width": "initial"})
            s.observe(self.guard(lambda _: self.refresh()), "value")
            self.sliders[name] = s
        self.figure = go.FigureWidget(viz.count_vs_truth_figure(self.true, self.counts()))
        self.widget = W.VBox([*self.sliders.values(), self.figure, self.log])

    def counts(self) -> dict:
        out = {}
        for name, sae in self.saes.items():
            s = self.sliders[name]
            z = (analysis.codes_with(sae, self.x, k=int(s.value)) if sae.per_token_k
                 else analysis.codes_with(sae, self.x, threshold=float(s.value)))
            out[name] = (z != 0).sum(-1).cpu().numpy()
        return out

    def refresh(self) -> None:
        new = viz.count_vs_truth_figure(self.true, self.counts())
        with self.figure.batch_update():
            for old, tr in zip(self.figure.data, new.data):
                old.y, old.name = tr.y, tr.name
                if tr.error_y is not None:
                    old.error_y = tr.error_y


class TrainingMonitor:
    """Live training curves (loss, NMSE, L0, dead fraction) for `train(..., callback=monitor)`."""

    PANELS = ("loss", "nmse", "l0", "dead_frac")

    def __init__(self, names: list[str] | None = None, every: int = 5):
        from plotly.subplots import make_subplots

        self.every = every
        fig = make_subplots(rows=1, cols=4, subplot_titles=["loss (log scale)", "NMSE of the batch",
                                                             "L0 (dashed: the target)", "dead latents"])
        fig.update_layout(template="plotly_white", height=320, title="training", showlegend=True)
        fig.update_xaxes(title_text="training tokens")
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_yaxes(title_text="active latents per token", row=1, col=3)
        fig.update_yaxes(title_text="fraction of latents", row=1, col=4)
        self.figure = go.FigureWidget(fig)
        self.names = names
        self.widget = self.figure

    def __call__(self, trainer, stats) -> None:
        if trainer.step % self.every and trainer.step != trainer.tc.total_steps:
            return
        names = self.names or trainer.names
        if not self.figure.data:
            for i, name in enumerate(names):
                for p, key in enumerate(self.PANELS, start=1):
                    self.figure.add_scatter(x=[], y=[], mode="lines", name=name, legendgroup=name,
                                            showlegend=(p == 1), line=dict(color=trainer.saes[i].color), row=1, col=p)
                sae = trainer.saes[i]
                target = sae.cfg.target_l0 or (sae.cfg.k if sae.has_k else None)
                if target:  # the L0 the architecture aims at, for the eye
                    self.figure.add_hline(y=target, line_dash="dash", line_color=sae.color, row=1, col=3)
        with self.figure.batch_update():
            for i, s in enumerate(stats):
                for p, key in enumerate(self.PANELS):
                    tr = self.figure.data[i * len(self.PANELS) + p]
                    tr.x = tuple(tr.x) + (s["tokens"],)
                    tr.y = tuple(tr.y) + (s[key],)
