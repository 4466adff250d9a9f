"""The absorption explorer: pick an SAE and a letter, and see the letter's main latents, the
latents that absorb it and the words where they do; each latent opens in the feature dashboard."""

from __future__ import annotations

import html
from collections import Counter

import ipywidgets as W

from .base import Responsive


class AbsorptionExplorer(Responsive):
    """Over SAEBench absorption documents ({SAE name: document}, from saekit.bench). A latent's
    button opens it in that SAE's FeatureExplorer when `feature_explorers` ({SAE name:
    FeatureExplorer}) has one."""

    def __init__(self, docs: dict[str, dict], feature_explorers: dict | None = None):
        self._init_log()
        self.docs = docs
        self.feature_explorers = feature_explorers or {}
        self.sae_choice = W.Dropdown(options=list(docs), description="SAE")
        self.letter = W.Dropdown(description="letter")
        self.info = W.HTML()
        self.main_buttons = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.absorber_buttons = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.words = W.HTML()
        self.sae_choice.observe(self.guard(lambda _: self._letters()), names="value")
        self.letter.observe(self.guard(lambda _: self.show()), names="value")
        self.widget = W.VBox(
            [
                W.HBox([self.sae_choice, self.letter]),
                self.info,
                W.HTML("<b>main latents</b> (k-sparse probing's pick for the letter):"),
                self.main_buttons,
                W.HTML("<b>absorbing latents</b> (the top latent on each absorbed word):"),
                self.absorber_buttons,
                self.words,
                self.log,
            ]
        )
        self._letters()

    def _letters(self) -> None:
        doc = self.docs[self.sae_choice.value]
        letters = [d["first_letter"] for d in doc["eval_result_details"]]
        self.letter.options = letters
        if letters and self.letter.value not in letters:
            self.letter.value = letters[0]
        self.show()

    def letter_row(self) -> dict:
        """The chosen letter's per-letter record (probe F1, main latents, F1 against k, ...)."""
        doc = self.docs[self.sae_choice.value]
        rows = doc["eval_result_unstructured"]["letters"]
        return next(r for r in rows if r["first_letter"] == self.letter.value)

    def absorbed_words(self) -> list[dict]:
        """The chosen letter's scored words with an absorption fraction above 0, most first."""
        doc = self.docs[self.sae_choice.value]
        words = [
            w
            for w in doc["eval_result_unstructured"]["words"]
            if w["letter"] == self.letter.value and w["absorption_fraction"] > 0
        ]
        return sorted(words, key=lambda w: -w["absorption_fraction"])

    def show(self) -> None:
        if self.letter.value is None:
            self.info.value = "<i>no letter passed the probe's F1 threshold</i>"
            self.main_buttons.children = self.absorber_buttons.children = ()
            self.words.value = ""
            return
        row, absorbed = self.letter_row(), self.absorbed_words()
        fx = self.feature_explorers.get(self.sae_choice.value)
        self.info.value = (
            f"letter <b>{row['first_letter']}</b>: probe F1 {row['probe_f1']:.2f}, "
            f"{row['num_probe_true_positives']} words found by the probe, mean absorption "
            f"<b>{row['mean_absorption_fraction']:.3f}</b>, full absorption "
            f"{row['full_absorption_rate']:.3f}"
            + ("" if fx else " &middot; <i>pass feature_explorers= to open latents</i>")
        )
        self.main_buttons.children = [self._button(j, "", fx) for j in row["main_latents"]]
        counts = Counter(w["top_latent"] for w in absorbed)
        self.absorber_buttons.children = [
            self._button(j, f" on {n} word{'s' * (n > 1)}", fx) for j, n in counts.most_common(12)
        ]
        lines = [
            f"<tr><td>{html.escape(w['word'])!s}</td><td>{w['absorption_fraction']:.2f}</td>"
            f"<td>{'yes' if w['is_full_absorption'] else ''}</td><td>#{w['top_latent']}</td>"
            f"<td>{w.get('l0', '')}</td></tr>"
            for w in absorbed[:30]
        ]
        head = "<tr><th>word</th><th>fraction</th><th>full</th><th>top latent</th><th>L0</th></tr>"
        self.words.value = (
            f"<table>{head}{''.join(lines)}</table>" if lines else "<i>no absorbed words</i>"
        )

    def _button(self, latent: int, suffix: str, fx) -> W.Button:
        b = W.Button(description=f"#{latent}{suffix}", layout=W.Layout(width="auto"))
        b.disabled = fx is None
        if fx is not None:
            b.on_click(self.guard(lambda _, j=int(latent): setattr(fx.latent, "value", j)))
        return b
