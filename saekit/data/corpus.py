"""Corpora through `datasets`: the bundled one, local files and folders, hub ids (streamed);
their splits; documents in a seeded random order."""

from __future__ import annotations

import codecs
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

BUNDLED = "bundled"
_LOCAL_BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
HELD_OUT_EVERY = 20  # bundled corpus: every 20th document is the held-out "test" split
SHUFFLE_BUFFER = 10_000  # documents in the shuffle buffer of a streamed (hub) data set


class CorpusError(ValueError):
    """A corpus that cannot be found or read."""


def bundled_corpus_path() -> Path:
    """The bundled public-domain corpus: inside the installed package, or `data/` in a checkout."""
    here = Path(__file__).resolve().parents[1]  # the saekit package
    for p in (here / "_data" / "corpus.jsonl", here.parent / "data" / "corpus.jsonl"):
        if p.exists():
            return p
    raise CorpusError(
        "the bundled corpus (corpus.jsonl) is missing from this install; reinstall saekit"
    )


def load_corpus(
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool | None = None,
):
    """A `datasets` Dataset (or IterableDataset for hub names) of documents.

    name: None/"bundled" for the bundled corpus, a local .txt/.jsonl/.json/.parquet/.csv file or
    folder, or a hub data-set id (streamed). For the bundled corpus, split is "train", "test" (every
    20th document, held out) or "all"; a local corpus's splits are described at `local_split`.
    """
    return corpus_split(name, split, text_field, streaming)[0]


def corpus_split(
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool | None = None,
) -> tuple:
    """load_corpus, and the rule that drew its split (for a store's manifest): (Dataset, rule)."""
    import datasets

    datasets.disable_progress_bars()
    if name is None or name == BUNDLED:
        ds = datasets.load_dataset("json", data_files=str(bundled_corpus_path()), split="train")
        _check_field(ds, text_field, BUNDLED)  # as a local corpus's is
        rule = {"method": f"every {HELD_OUT_EVERY}th document is test"}
        if split == "all":
            return ds, rule
        if split not in ("train", "test"):
            raise CorpusError(
                f"the bundled corpus has splits 'train', 'test' and 'all', not '{split}'"
            )
        held = split == "test"
        return ds.filter(lambda _, i: (i % HELD_OUT_EVERY == 0) == held, with_indices=True), rule
    path = Path(name).expanduser()
    if path.exists():
        return local_split(path, split, text_field, name)
    try:
        ds = datasets.load_dataset(
            name, split=split, streaming=True if streaming is None else streaming
        )
    except Exception as e:  # datasets raises many types for "not reachable" / "no such data set"
        raise CorpusError(
            f"could not load data set '{name}': it is not a local file or folder and the hub did "
            "not provide it "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Use the "
            "bundled corpus "
            f"(name=None, --corpus {BUNDLED}) or a local .txt/.jsonl/.parquet file."
        ) from e
    return ds, {"method": "the data set's own split"}


SPLIT_NAMES = {
    "train": "train",
    "test": "test",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
}
# a local corpus without splits of its own: this share of its documents is "test"
LOCAL_TEST_FRACTION = 0.1
LOCAL_SPLIT_SEED = 0  # fixed, so that every capture of one corpus draws the same train/test line


def local_split(path: Path, split: str, text_field: str = "text", name: str | None = None) -> tuple:
    """One split of a local corpus (a file or a folder of files of one kind), never the whole of it
    by mistake.

    The files define the splits where they can: a `split` column, or files (or folders) named train
    / test / validation (valid, dev). Otherwise saekit splits the documents itself, seeded and
    fixed: a random LOCAL_TEST_FRACTION of them is "test", the rest "train". "all" is every
    document. A split that does not exist is a CorpusError naming those that do. Returns (Dataset,
    the rule that made the split: a store's manifest records it as corpus.split_rule)."""
    files, builder = _local_files(path)
    by_name = {f: _split_of(f.relative_to(path) if path.is_dir() else Path(f.name)) for f in files}
    named = {s for s in by_name.values() if s is not None}
    if named and None in by_name.values():
        loose = [str(f) for f, s in by_name.items() if s is None][:3]
        raise CorpusError(
            f"{path}: some files are named by split ({', '.join(sorted(named))}) and some are not "
            f"({', '.join(loose)}); name every file or folder train/test/validation, or none"
        )
    if named:
        if split != "all" and SPLIT_NAMES.get(split, split) not in named:
            raise CorpusError(
                f"{path} has no '{split}' split; its files give "
                f"{', '.join(sorted(named))} (or 'all')"
            )
        files = [
            f for f, s in by_name.items() if split == "all" or s == SPLIT_NAMES.get(split, split)
        ]
    if builder == "json":  # before datasets reads them: a bad record is named by its line
        nulls = sum(_check_json_records(f, text_field) for f in files)
    ds = _read_local(builder, files, name or str(path))
    _check_field(ds, text_field, name or str(path))
    if named:
        rule = {"method": "files named by split", "n_files": len(files)}
    elif "split" in ds.column_names:
        ds, rule = _by_split_column(ds, split, path)
    else:
        ds, rule = _seeded_split(ds, split, path)
    if len(ds) == 0:
        raise CorpusError(
            f"split '{split}' of {path} holds no documents; use a larger corpus or --split all"
        )
    if builder == "json" and nulls:
        rule["null_texts_skipped"] = nulls
        warnings.warn(
            f"{nulls:,} record(s) of {path} have a null '{text_field}'; they are skipped",
            stacklevel=2,
        )
    return ds, rule


def _local_files(path: Path) -> tuple[list[Path], str]:
    """A local corpus's files (the file itself, or every readable file under a folder) and the
    `datasets` builder that reads them, one kind per corpus."""
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS)
        if path.is_dir()
        else [path]
    )
    if not files:
        raise CorpusError(f"no .txt/.jsonl/.json/.parquet/.csv files under {path}")
    builders = {_LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise CorpusError(f"{path}: use one of {', '.join(_LOCAL_BUILDERS)} (one kind per folder)")
    return files, builders.pop()


def _by_split_column(ds, split: str, path: Path) -> tuple:
    """The rows of a corpus whose `split` column says `split` ("all": every row)."""
    values = sorted({str(v) for v in ds["split"]})
    if split != "all" and split not in values:
        raise CorpusError(
            f"{path} has no '{split}' split; "
            f"its `split` column holds {', '.join(values)} (or 'all')"
        )
    if split != "all":
        ds = ds.filter(lambda row: str(row["split"]) == split)
    return ds, {"method": "split column"}


def _seeded_split(ds, split: str, path: Path) -> tuple:
    """A corpus without splits of its own, split by saekit: a seeded, fixed random
    LOCAL_TEST_FRACTION of its documents is "test", the rest "train"."""
    if split not in ("train", "test", "all"):
        raise CorpusError(
            f"{path} has no splits of its own, so saekit splits its documents into 'train' and "
            f"'test' (or 'all'), not '{split}'"
        )
    n_test = round(len(ds) * LOCAL_TEST_FRACTION) if len(ds) > 1 else 0
    test = np.zeros(len(ds), dtype=bool)
    test[np.random.default_rng(LOCAL_SPLIT_SEED).permutation(len(ds))[:n_test]] = True
    if split != "all":
        ds = ds.select(np.flatnonzero(test == (split == "test")))
    rule = {
        "method": "seeded document split",
        "seed": LOCAL_SPLIT_SEED,
        "test_fraction": LOCAL_TEST_FRACTION,
        "n_documents": int(test.size),
        "n_test": int(n_test),
    }
    return ds, rule


def _split_of(relative: Path) -> str | None:
    """The split a local file belongs to by its name or a folder's (train.jsonl, test/part1.txt),
    if any."""
    for part in relative.parts:
        stem = part.split(".")[0].lower()
        for word, split in SPLIT_NAMES.items():
            if stem == word or stem.startswith(f"{word}-") or stem.startswith(f"{word}_"):
                return split
    return None


def _read_local(builder: str, files: list[Path], name: str):
    """The local files as one `datasets` Dataset; a file that is not UTF-8 text or that its format
    cannot parse is a CorpusError naming it."""
    import datasets

    for f in files:
        if builder != "parquet":
            _check_utf8(f)
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", **kwargs
        )
    except Exception as e:  # datasets wraps parse errors in its own types
        raise CorpusError(
            f"could not read corpus {name} as {builder} ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); check the file's format"
        ) from e


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"corpus file {path} is not UTF-8 text (byte {offset + e.start} cannot "
                    "be decoded); convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if not block:
                return
            offset += len(block)


def _check_json_records(path: Path, text_field: str) -> int:
    """Each JSON-lines record's text a string or null: anything else is a CorpusError naming the
    line. Returns the number of nulls (skipped as documents). A file that is not JSON lines (one
    JSON array) is left to `datasets`."""
    nulls = 0
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                return nulls
            value = record.get(text_field) if isinstance(record, dict) else None
            if value is None:
                nulls += isinstance(record, dict) and text_field in record
            elif not isinstance(value, str):
                raise CorpusError(
                    f"corpus file {path}, line {line_no}: '{text_field}' is {value!r} (a JSON "
                    f"{type(value).__name__}), expected a string; fix or remove that record"
                )
    return nulls


def _check_field(ds, text_field: str, name: str) -> None:
    cols = getattr(ds, "column_names", None)
    if cols is not None and text_field not in cols:
        raise CorpusError(
            f"corpus '{name}' has no '{text_field}' column (columns: {cols}); pass the column of "
            "text as text_field= (--text-field)"
        )
    kind = getattr(getattr(ds, "features", {}).get(text_field), "dtype", "string")
    if kind not in ("string", "large_string", "null"):
        raise CorpusError(
            f"corpus '{name}': column '{text_field}' holds {kind} values, expected strings; "
            "give a column of text (text_field=, --text-field)"
        )


def iter_texts(ds, text_field: str = "text") -> Iterator[str]:
    for _, t in iter_documents(ds, text_field):
        yield t


def iter_documents(
    ds, text_field: str = "text", order: Iterable[int] | None = None
) -> Iterator[tuple[int, str]]:
    """(document index, text) of every non-blank document; `order` visits a map-style data set's
    rows in that order (the index is then the row's own, so it points back into the corpus)."""
    rows = enumerate(ds) if order is None else zip((int(i) for i in order), ds.select(order))
    for i, row in rows:
        if text_field not in row:
            raise CorpusError(
                f"corpus rows have no '{text_field}' field (fields: {list(row)}); pass text_field="
            )
        t = row[text_field]
        if t and t.strip():
            yield i, t


def sample_documents(
    ds,
    text_field: str = "text",
    shuffle: bool = True,
    seed: int = 0,
    buffer_size: int = SHUFFLE_BUFFER,
) -> tuple[Iterator[tuple[int, str]], dict]:
    """Documents in a seeded random order, and a record of how they were drawn (for the manifest).

    Map-style data sets (bundled, local files) are permuted whole; streamed data sets pass through a
    shuffle buffer of `buffer_size` documents (datasets' IterableDataset.shuffle), so a capture of N
    tokens draws from across the set instead of its first documents. The same seed gives the same
    order, so a resumed capture sees the same tokens.
    """
    if not shuffle:
        return iter_documents(ds, text_field), {"method": "document order"}
    if hasattr(ds, "select") and hasattr(ds, "__len__"):
        order = np.random.default_rng(seed).permutation(len(ds))
        return iter_documents(ds, text_field, order), {"method": "shuffled documents", "seed": seed}
    shuffled = ds.shuffle(seed=seed, buffer_size=buffer_size)
    return iter_documents(shuffled, text_field), {
        "method": "shuffle buffer",
        "seed": seed,
        "buffer_size": buffer_size,
    }
