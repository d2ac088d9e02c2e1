"""Data layer: text sources (bundled corpus, local files, tfds) and tokenize/pack/shard/batch."""

from loraprune_jax.data.corpora import (
    HELDOUT_EVERY,
    LEE_FILE,
    WIKI_FILE,
    clean_wiki_text,
    default_heldout_texts,
    default_train_texts,
    gensim_test_data_dir,
    jsonl_file,
    lee_text,
    load_texts,
    text_dir,
    text_file,
    wikitext_rows,
    wiki_articles,
    wiki_documents,
)
from loraprune_jax.data.packing import (
    PackedDataset,
    encode_fn,
    pack_documents,
    tokenize_join,
    windows,
)
from loraprune_jax.data.tfds_source import TfdsTextSource, parse_tfds_spec, tfds_texts

__all__ = [
    "HELDOUT_EVERY",
    "LEE_FILE",
    "WIKI_FILE",
    "PackedDataset",
    "TfdsTextSource",
    "clean_wiki_text",
    "default_heldout_texts",
    "default_train_texts",
    "encode_fn",
    "gensim_test_data_dir",
    "jsonl_file",
    "lee_text",
    "load_texts",
    "pack_documents",
    "parse_tfds_spec",
    "text_dir",
    "text_file",
    "wikitext_rows",
    "tfds_texts",
    "tokenize_join",
    "wiki_articles",
    "wiki_documents",
    "windows",
]
