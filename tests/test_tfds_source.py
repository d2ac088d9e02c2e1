"""tfds data source: a tiny array_record dataset built locally, read back without TensorFlow."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

import tensorflow_datasets as tfds

from loraprune_jax.data import load_texts, parse_tfds_spec, tfds_texts  # noqa: E402

TRAIN = ["hello world", "ünïcode ✓ text", "", "third line\nwith a newline", "five"]
TEST = ["only test example"]


class LorapruneTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Tiny text dataset; not registered, so reading it back goes through its files only."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "meta": {"idx": tfds.features.Scalar(np.int64)}}
            ),
            disable_shuffling=True,  # keep generation order so indices are checkable
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(TRAIN), "test": self._generate_examples(TEST)}

    def _generate_examples(self, texts):
        for i, text in enumerate(texts):
            yield i, {"text": text, "meta": {"idx": i}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    builder = LorapruneTinyText(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    files = sorted(p.name for p in (root / "loraprune_tiny_text" / "1.0.0").iterdir())
    assert any(".array_record-" in f for f in files), files
    assert "dataset_info.json" in files
    return root


def test_roundtrip_random_access(data_dir):
    ds = tfds_texts("loraprune_tiny_text", data_dir=data_dir)
    assert len(ds) == len(TRAIN)
    # random access, out of order, negative indices, slices and batched reads
    assert ds[3] == TRAIN[3]
    assert ds[1] == TRAIN[1]
    assert isinstance(ds[0], str) and ds[0] == "hello world"
    assert ds[-1] == TRAIN[-1]
    assert ds[1:4] == TRAIN[1:4]
    assert ds.__getitems__([4, 0, 2]) == [TRAIN[4], TRAIN[0], TRAIN[2]]
    assert list(ds) == TRAIN
    with pytest.raises(IndexError):
        ds[len(TRAIN)]
    test = tfds_texts("loraprune_tiny_text", split="test", data_dir=data_dir)
    assert list(test) == TEST
    sub = tfds_texts("loraprune_tiny_text", split="train[1:3]", data_dir=data_dir)
    assert list(sub) == TRAIN[1:3]


def test_nested_and_missing_field(data_dir):
    with pytest.raises(TypeError, match="not text"):
        tfds_texts("loraprune_tiny_text", data_dir=data_dir, field="meta/idx")[0]
    with pytest.raises(KeyError, match="body"):
        tfds_texts("loraprune_tiny_text", data_dir=data_dir, field="body")[0]


def test_load_texts_tfds_spec(data_dir):
    assert list(load_texts("tfds:loraprune_tiny_text:test", data_dir=data_dir)) == TEST
    assert list(load_texts("tfds:loraprune_tiny_text", data_dir=data_dir)) == TRAIN
    assert parse_tfds_spec("tfds:wiki40b/en:1.3.0:test") == ("wiki40b/en:1.3.0", "test")
    assert parse_tfds_spec("tfds:wiki40b/en:1.3.0") == ("wiki40b/en:1.3.0", None)
    assert parse_tfds_spec("tfds:c4/en:train[:1%]") == ("c4/en", "train[:1%]")


def test_no_tensorflow(data_dir):
    """The whole round trip above ran without TensorFlow."""
    list(tfds_texts("loraprune_tiny_text", data_dir=data_dir))
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; cannot prove TF-free operation")
    assert "tensorflow" not in sys.modules


def test_parse_tfds_spec_edge_cases():
    assert parse_tfds_spec("tfds:c4/en:3.0.1:train[:10]") == ("c4/en:3.0.1", "train[:10]")
    assert parse_tfds_spec("tfds:mnist") == ("mnist", None)
    with pytest.raises(ValueError):
        parse_tfds_spec("mnist:train")
    with pytest.raises(ValueError):
        parse_tfds_spec("tfds::train")


def test_shard_reads_only_its_records(data_dir, monkeypatch):
    """A process of a multi-host job asks for its share, and only those records are read."""
    from loraprune_jax.data.tfds_source import TfdsTextSource

    read: list[int] = []
    original = TfdsTextSource.__getitems__

    def spy(self, keys):
        keys = list(keys)
        read.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(TfdsTextSource, "__getitems__", spy)
    got = load_texts("tfds:loraprune_tiny_text", data_dir=data_dir, shard=(1, 2))
    assert list(got) == TRAIN[1::2]
    assert sorted(read) == [1, 3]
    with pytest.raises(ValueError, match="fewer than the 6 data shards"):
        load_texts("tfds:loraprune_tiny_text", data_dir=data_dir, shard=(0, 6))
