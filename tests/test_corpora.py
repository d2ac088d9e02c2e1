"""Text sources: the bundled gensim corpus, local files and the spec dispatcher."""

from __future__ import annotations

import json
import os
import re

import pytest

from loraprune_jax.data import corpora
from loraprune_jax.data.corpora import (
    default_heldout_texts,
    default_train_texts,
    jsonl_file,
    lee_text,
    load_texts,
    text_dir,
    text_file,
    wiki_articles,
    wiki_documents,
)

_COMMON = {"the", "of", "and", "in", "to", "is", "a", "was"}


def _english_ratio(text: str) -> float:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in _COMMON for w in words) / max(len(words), 1)


def test_wiki_split_deterministic_disjoint_nonempty():
    train_docs, held_docs = wiki_documents("train"), wiki_documents("heldout")
    assert len(train_docs) > 50 and len(held_docs) >= 5
    train_titles = {t for t, _ in train_docs}
    held_titles = {t for t, _ in held_docs}
    assert not train_titles & held_titles
    every = wiki_documents()
    assert len(every) == len(train_docs) + len(held_docs)
    # every HELDOUT_EVERY-th article in file order is held out (~10%)
    assert [t for i, (t, _) in enumerate(every) if i % 10 == 9] == [t for t, _ in held_docs]
    assert 0.05 < len(held_docs) / len(every) < 0.15
    # deterministic: the same split in every process (pinned: gensim 4.4.0's test dump)
    assert (len(train_docs), len(held_docs)) == (96, 10)
    assert [t for t, _ in held_docs] == [
        "Academy Award for Best Production Design", "List of Atlas Shrugged characters", "Andre Agassi",
        "Aldous Huxley", "America the Beautiful", "A Modest Proposal", "Aardwolf", "Angola",
        "List of anthropologists", "Art"]
    assert wiki_documents("heldout") == held_docs
    assert wiki_articles("train") == [x for _, x in train_docs]
    assert default_train_texts() == wiki_articles("train")
    with pytest.raises(ValueError, match="unknown split"):
        wiki_articles("test")


def test_wiki_text_is_clean_english():
    docs = wiki_documents()
    titles = [t for t, _ in docs]
    assert "Anarchism" in titles and "Albert Einstein" in titles
    assert not any(":" in t and t.split(":")[0] == "Wikipedia" for t in titles)
    for title, text in docs:
        assert text and text == text.strip(), title
        assert not text.upper().startswith("#REDIRECT"), title
        for markup in ("[[", "]]", "{{", "}}", "<ref", "'''", "\n\n\n"):
            assert markup not in text, (title, markup)
    # English prose: common function words are frequent overall and in every long article
    # (short list/disambiguation pages are legitimately list-like)
    assert _english_ratio("\n\n".join(text for _, text in docs)) > 0.15
    assert all(_english_ratio(text) > 0.08 for _, text in docs if len(text) > 10_000)
    anarchism = dict(docs)["Anarchism"]
    assert anarchism.startswith("Anarchism is a political philosophy")


def test_lee_text_is_the_raw_file():
    path = os.path.join(corpora.gensim_test_data_dir(), corpora.LEE_FILE)
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    assert lee_text() == raw
    assert len(raw) > 100_000 and _english_ratio(raw) > 0.1


def test_default_heldout_texts():
    held = default_heldout_texts()
    assert set(held) == {"wiki", "lee"}
    assert held["wiki"] == "\n\n".join(wiki_articles("heldout"))
    assert held["lee"] == lee_text()
    assert not set(wiki_articles("train")) & set(wiki_articles("heldout"))


def test_text_file_roundtrip_and_errors(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo\nworld\n", encoding="utf-8")
    assert text_file(p) == "héllo\nworld\n"
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text_file(missing)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*UTF-8"):
        text_file(bad)


def test_jsonl_file_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert jsonl_file(p) == ["one", "two"]
    q = tmp_path / "other.jsonl"
    q.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    assert jsonl_file(q, field="body") == ["x"]
    with pytest.raises(ValueError, match=r"other\.jsonl:1: missing field 'text'"):
        jsonl_file(q)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "oops"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        jsonl_file(bad)
    notstr = tmp_path / "num.jsonl"
    notstr.write_text('{"text": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"num\.jsonl:1: .*not a string"):
        jsonl_file(notstr)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        jsonl_file(tmp_path / "missing.jsonl")


def test_load_texts_dispatch(tmp_path):
    assert load_texts("default") == wiki_articles("train")
    assert load_texts("wiki", split="heldout") == wiki_articles("heldout")
    assert load_texts("wiki:heldout") == wiki_articles("heldout")
    assert load_texts("lee") == [lee_text()]
    (tmp_path / "x.raw").write_text("raw text", encoding="utf-8")
    assert load_texts(str(tmp_path / "x.raw")) == ["raw text"]
    (tmp_path / "y.jsonl").write_text('{"text": "j"}\n', encoding="utf-8")
    assert load_texts(tmp_path / "y.jsonl") == ["j"]
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("second", encoding="utf-8")
    (d / "a.txt").write_text("first", encoding="utf-8")
    (d / "ignored.md").write_text("no", encoding="utf-8")
    assert load_texts(d) == ["first", "second"] == text_dir(d)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        load_texts(str(tmp_path / "absent.txt"))
    with pytest.raises(FileNotFoundError, match="no such text source"):
        load_texts(str(tmp_path / "absent_thing"))
    (tmp_path / "z.csv").write_text("a,b", encoding="utf-8")
    assert load_texts(tmp_path / "z.csv") == ["a,b"]  # any UTF-8 file is one plain-text document
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_texts(empty)


def test_any_utf8_file_is_text_whatever_its_name(tmp_path):
    cor = os.path.join(corpora.gensim_test_data_dir(), "miIslita.cor")  # gensim's corpus format
    with open(cor, "rb") as f:
        raw = f.read()
    (doc,) = load_texts(cor)
    assert doc == raw.decode("utf-8") and len(doc) == 169
    assert doc.splitlines()[0] == "LSI tutorials and fast tracks"
    licence = tmp_path / "LICENSE"  # no suffix at all
    licence.write_text("Copyright (c) 2024 Zoë\nPermission is hereby granted.\n", encoding="utf-8")
    assert load_texts(str(licence)) == ["Copyright (c) 2024 Zoë\nPermission is hereby granted.\n"]
    d = tmp_path / "docs"  # a directory still takes only its *.txt files
    d.mkdir()
    (d / "a.txt").write_text("kept", encoding="utf-8")
    (d / "LICENSE").write_text("skipped", encoding="utf-8")
    assert load_texts(d) == ["kept"]


def test_a_binary_file_is_one_clear_error_naming_it(tmp_path):
    bz2_dump = os.path.join(corpora.gensim_test_data_dir(), corpora.WIKI_FILE)  # real binary data
    with pytest.raises(ValueError, match=re.escape(corpora.WIKI_FILE) + r": not valid UTF-8 \("):
        load_texts(bz2_dump)
    nul = tmp_path / "weights.bin"  # valid UTF-8 bytes, but with NULs: not text either
    nul.write_bytes(b"GGUF\x03\x00\x00\x00abc")
    with pytest.raises(ValueError, match=r"weights\.bin: not a text file \(a NUL character at "
                                         r"character 5\)"):
        load_texts(nul)
    with pytest.raises(ValueError, match="not a regular file"):
        load_texts("/dev/null")


def test_load_texts_shards_split_the_documents(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.txt").write_text(f"document {i}")
    shards = [list(load_texts(d, shard=(i, 2))) for i in range(2)]
    assert shards == [["document 0", "document 2", "document 4"], ["document 1", "document 3"]]
    with pytest.raises(ValueError, match="bad data shard 2 of 2"):
        load_texts(d, shard=(2, 2))
    with pytest.raises(ValueError, match="set data_shards=1"):
        load_texts("lee", shard=(0, 2))


def test_wikitext_rows_rebuild_the_usual_text(tmp_path):
    """Rows as Hugging Face's wikitext-2-raw-v1 has them; joined with blank lines they give the
    pruning papers' perplexity text."""
    raw = " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded @-@ Chronicles .\n \n"
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(raw.encode("utf-8"))
    rows = load_texts(f"wikitext:{path}")
    assert rows == ["", " = Valkyria Chronicles III = \n", "",
                    " Senjō no Valkyria 3 : Unrecorded @-@ Chronicles .\n", ""]
    assert "\n\n".join(rows) == (
        "\n\n = Valkyria Chronicles III = \n\n\n\n\n"
        " Senjō no Valkyria 3 : Unrecorded @-@ Chronicles .\n\n\n")
    (tmp_path / "empty.raw").write_text("")
    with pytest.raises(ValueError, match="empty WikiText file"):
        load_texts(f"wikitext:{tmp_path / 'empty.raw'}")
