"""`saekit bench` refuses bad input with exit code 2 and a message that names the problem and the
fix, before any work and without touching what is already written."""

import numpy as np
import pytest
from bad_input import cli, copy, edit_json, refused, snapshot

from saekit.bench import BenchError, ProbingConfig, probing_data
from saekit.bench.letters import choose_words


def test_unknown_evaluations_and_an_output_file_are_refused(sae_dir, tmp_path):
    refused(cli("bench", sae_dir, "--evals", "core,autointerp"), "autointerp", "sparse-probing")
    refused(cli("bench", sae_dir, "--evals", ","), "none given")
    a_file = tmp_path / "results"
    a_file.write_text("mine")
    refused(cli("bench", sae_dir, "--out", a_file, "--evals", "core"), "is a file", "folder")
    assert a_file.read_text() == "mine"


def test_an_sae_of_another_model_or_hook_is_refused(my_sae, tmp_path):
    edit_json(my_sae / "cfg.json", lambda c: c["saekit"].update(model_name="gpt2"))
    before = snapshot(my_sae)
    out = tmp_path / "out"
    refused(cli("bench", my_sae, "--out", out, "--evals", "core"), "gpt2", "SmolLM2")
    other = copy(my_sae, tmp_path / "hook")
    edit_json(other / "cfg.json", lambda c: c["saekit"].update(hook_name="resid_post.99"))
    refused(cli("bench", other, "--out", out, "--evals", "core"), "resid_post.99")
    assert snapshot(my_sae) == before
    assert not list(out.rglob("*_eval_results.json"))


def test_two_saes_filed_under_one_name_are_refused(sae_dir, tmp_path):
    twin = copy(sae_dir, tmp_path / "x" / sae_dir.name)
    refused(cli("bench", sae_dir, twin, "--out", tmp_path / "out"), "share a name")


def test_letters_with_too_few_single_token_words_are_skipped_and_named(tokenizer):
    words, letters, train, skipped = choose_words(tokenizer, 26 * 100, 80, seed=0)
    assert "x" in skipped and skipped["x"] < 80  # SmolLM2 has 75 x-words in all
    assert all(w.strip()[0].lower() not in skipped for w in words)
    assert set(np.unique(letters)) == {
        i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz") if c not in skipped
    }
    with pytest.raises(BenchError, match="too few single-token alphabetic words"):
        choose_words(tokenizer, 26 * 60, 10**6, seed=0)


def test_a_corpus_without_the_labels_the_tasks_need_is_refused(model, tmp_path):
    corpus = tmp_path / "plain.txt"
    corpus.write_text("Some text with no labels at all.\n\nAnother document.\n")
    with pytest.raises(BenchError, match="no author, genre, title column.*bundled corpus"):
        probing_data(model, "resid_post.6", str(corpus), ProbingConfig())
