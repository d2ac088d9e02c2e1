"""Text sources: the bundled offline corpus, local files, and a spec dispatcher.

The default corpus is real English text that ships with gensim 4.4.0's test data, so training and
evaluation work offline:

* ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` -- a shortened English
  Wikipedia dump. It is parsed with gensim's own ``extract_pages`` and cleaned with ``filter_wiki``;
  redirects, non-article namespaces and pages that clean to nothing are dropped. Articles are split
  deterministically by position: every ``HELDOUT_EVERY``-th kept article in file order (indices
  9, 19, 29, ...) is held out (~10%), the rest is training text.
* ``lee_background.cor`` -- the Lee news corpus, a second held-out text, read whole and uncleaned.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..extras import require

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
HELDOUT_EVERY = 10
"""Every HELDOUT_EVERY-th kept wiki article (file order, index % 10 == 9) is held out."""

SPLITS = ("train", "heldout")

# Namespaces that are not articles (same list as gensim.corpora.wikicorpus.IGNORED_NAMESPACES;
# repeated here so the filter does not depend on a module-level constant staying public).
_IGNORED_NAMESPACES = (
    "Wikipedia", "Category", "File", "Portal", "Template", "MediaWiki", "User", "Help", "Book",
    "Draft", "WikiProject", "Special", "Talk", "Image", "Module", "TimedText",
)
_EMPHASIS = re.compile(r"'{2,5}")  # wiki bold/italic markup: ''italic'', '''bold'''
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def gensim_test_data_dir() -> str:
    """Directory of gensim's bundled test data, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("gensim is required for the bundled default corpus")
    path = os.path.join(os.path.dirname(spec.origin), "test", "test_data")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"gensim test data directory not found: {path}")
    return path


def _bundled_file(name: str) -> str:
    path = os.path.join(gensim_test_data_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"bundled corpus file missing from gensim test data: {path}")
    return path


def clean_wiki_text(raw: str) -> str:
    """Wiki markup -> plain text: gensim ``filter_wiki``, drop ''/''' emphasis, tidy whitespace."""
    filter_wiki = require("gensim.corpora.wikicorpus", "the bundled Wikipedia corpus").filter_wiki

    text = filter_wiki(raw)
    text = _EMPHASIS.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def _is_article(title: str, raw: str) -> bool:
    if any(title.startswith(ns + ":") for ns in _IGNORED_NAMESPACES):
        return False
    return not raw.lstrip().lower().startswith("#redirect")


@functools.lru_cache(maxsize=1)
def _wiki_documents_all() -> tuple[tuple[str, str], ...]:
    """All kept (title, clean text) articles of the bundled dump, in file order (cached)."""
    extract_pages = require("gensim.corpora.wikicorpus", "the bundled Wikipedia corpus").extract_pages

    docs = []
    with bz2.open(_bundled_file(WIKI_FILE), "rb") as f:
        for title, raw, _pageid in extract_pages(f):
            if not title or not raw or not _is_article(title, raw):
                continue
            text = clean_wiki_text(raw)
            if text:
                docs.append((title, text))
    return tuple(docs)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def wiki_documents(split: str | None = None) -> list[tuple[str, str]]:
    """(title, text) wiki articles of ``split`` ("train" | "heldout"; None = all), file order."""
    docs = _wiki_documents_all()
    if split is None:
        return list(docs)
    heldout = _check_split(split) == "heldout"
    return [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout]


def wiki_articles(split: str = "train") -> list[str]:
    """Clean article texts of the bundled Wikipedia sample for ``split`` ("train" | "heldout")."""
    return [text for _, text in wiki_documents(split)]


def lee_text() -> str:
    """The Lee background news corpus, read whole and uncleaned (golden perplexities use it)."""
    with open(_bundled_file(LEE_FILE), encoding="utf-8") as f:
        return f.read()


def default_heldout_texts() -> dict[str, str]:
    """Held-out evaluation texts: {"wiki": held-out articles joined by blank lines, "lee": ...}."""
    return {"wiki": "\n\n".join(wiki_articles("heldout")), "lee": lee_text()}


def default_train_texts() -> list[str]:
    """Training documents of the bundled corpus (the wiki train split)."""
    return wiki_articles("train")


# ----------------------------------------------------------------------------- local files


def text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file of any name read whole (universal newlines, like ``open(...).read()``).

    A file that is not UTF-8 text (invalid UTF-8, or a NUL character, which no text file has
    and most binary formats do) is a ``ValueError`` that names the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"expected a text file but got a directory: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                         "expected a UTF-8 text file") from None
    nul = text.find("\0")
    if nul >= 0:
        raise ValueError(f"{path}: not a text file (a NUL character at character {nul}); "
                         "expected a UTF-8 text file")
    return text


def jsonl_file(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The string ``field`` of every JSON object line of a .jsonl file (blank lines skipped)."""
    path = os.fspath(path)
    texts = []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"jsonl file not found: {path}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                kind = type(obj).__name__
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {kind}")
            if field not in obj:
                raise ValueError(
                    f"{path}:{lineno}: missing field {field!r} (fields: {sorted(obj)})"
                )
            value = obj[field]
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string"
                )
            texts.append(value)
    return texts


def text_dir(path: str | os.PathLike) -> list[str]:
    """Every ``*.txt`` file of a directory (not recursive), one document each, sorted by name.

    Only ``*.txt``: a directory also holds READMEs, metadata and hidden files that are not meant
    as documents (a single file is read as text whatever its name)."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .txt files in directory: {os.fspath(path)}")
    return [text_file(p) for p in files]


def wikitext_rows(path: str | os.PathLike) -> list[str]:
    """The rows of a raw WikiText file (``wiki.test.raw``) as Hugging Face's ``wikitext-2-raw-v1``
    has them: one per line, the trailing newline kept, whitespace-only lines as ``""``.

    Joined with ``"\n\n"`` (what :func:`~loraprune_jax.data.packing.tokenize_join` does) they
    give the text of the usual pruning-paper perplexity protocol (SparseGPT, Wanda, LLM-Pruner).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not lines:
        raise ValueError(f"{path}: empty WikiText file")
    return [line if line.strip() else "" for line in lines]


_NAMED = ("default", "wiki", "lee")


def load_texts(
    spec: str | os.PathLike,
    split: str = "train",
    *,
    field: str = "text",
    data_dir: str | os.PathLike | None = None,
    shard: tuple[int, int] | None = None,
) -> Sequence[str]:
    """Documents named by ``spec``, for configs and the CLI.

    ``shard=(index, count)`` keeps only documents ``index, index + count, ...`` (for a tfds
    source only those records are read), so each process of a multi-host job reads its share.

    ``spec`` is one of:

    * ``"default"`` / ``"wiki"`` (optionally ``":train"`` / ``":heldout"``, else ``split``): the
      bundled Wikipedia articles; ``"lee"``: the Lee corpus as one document;
    * a ``.jsonl`` file (``field`` of every line), any other UTF-8 text file whatever its name
      (``.txt``, ``.raw``, gensim's ``.cor``, a licence file, ...: one document), or a directory
      of ``.txt`` files (sorted, one document each);
    * ``"tfds:NAME[:SPLIT]"``: a prepared tensorflow-datasets dataset in array_record format, read
      lazily with random access (``data_dir``: its tfds data dir; ``SPLIT`` defaults to ``split``);
    * ``"wikitext:PATH"``: a raw WikiText file as its Hugging Face rows (:func:`wikitext_rows`).
    """
    docs = _load_all(spec, split, field, data_dir)
    if shard is None:
        return docs
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad data shard {index} of {count}")
    if len(docs) < count:
        raise ValueError(
            f"{os.fspath(spec)!r} has {len(docs)} document(s), fewer than the {count} data shards; "
            "give a directory or .jsonl with more documents, or set data_shards=1 (every process "
            "then reads all of it)"
        )
    return docs[index::count]


def _load_all(
    spec: str | os.PathLike, split: str, field: str, data_dir: str | os.PathLike | None
) -> Sequence[str]:
    s = os.fspath(spec)
    if s.startswith("wikitext:"):
        return wikitext_rows(s[len("wikitext:"):])
    if s.startswith("tfds:"):
        from loraprune_jax.data.tfds_source import parse_tfds_spec, tfds_texts

        name, tsplit = parse_tfds_spec(s)
        return tfds_texts(name, split=tsplit or split, data_dir=data_dir, field=field)
    head, sep, tail = s.partition(":")
    if head in _NAMED:
        if head == "lee":
            if sep:
                raise ValueError(f"'lee' takes no split (it is held-out text): {s!r}")
            return [lee_text()]
        return wiki_articles(tail if sep else split)
    path = Path(s)
    if path.is_dir():
        return text_dir(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no such text source: {s!r} (expected 'default', 'wiki[:SPLIT]', 'lee', "
            "'tfds:NAME[:SPLIT]', 'wikitext:PATH', a UTF-8 text or .jsonl file, or a directory "
            "of .txt files)"
        )
    if not path.is_file():
        raise ValueError(f"{s}: not a regular file; expected a UTF-8 text file")
    if path.suffix.lower() == ".jsonl":
        return jsonl_file(path, field=field)
    return [text_file(path)]
