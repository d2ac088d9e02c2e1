"""Random-access text from tensorflow-datasets, without TensorFlow.

``tfds.data_source`` reads datasets prepared in the ``array_record`` file format through
``array_record``'s random-access reader and decodes examples with tfds' numpy-only feature decoding
(``features.deserialize_example_np``), so neither reading nor (for ``GeneratorBasedBuilder``
datasets) preparing needs TensorFlow. Datasets prepared as TFRecord cannot be read this way; tfds
then raises and asks for ``file_format="array_record"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, overload

from ..extras import require

_VERSION = re.compile(r"^[\d*]+\.[\d*]+\.[\d*]+$")


def parse_tfds_spec(spec: str) -> tuple[str, str | None]:
    """``"tfds:NAME[:SPLIT]"`` -> (NAME, SPLIT or None).

    NAME may carry tfds' own ``:VERSION`` suffix (``"tfds:wiki40b/en:1.3.0:test"``): a part right
    after the name that looks like a version (``X.Y.Z``) stays in the name. Everything after that is
    the split, tfds slicing included (``"tfds:c4/en:train[:1%]"``).
    """
    if not spec.startswith("tfds:"):
        raise ValueError(f"not a tfds spec (expected 'tfds:NAME[:SPLIT]'): {spec!r}")
    name, *parts = spec[len("tfds:"):].split(":")
    if parts and _VERSION.match(parts[0]):
        name += ":" + parts.pop(0)
    split = ":".join(parts)  # the split may itself hold ':' (tfds slicing, "train[:1%]")
    if not name:
        raise ValueError(f"empty dataset name in tfds spec: {spec!r}")
    return name, split or None


def _to_str(value: Any, field: str) -> str:
    if isinstance(value, bytes):  # includes np.bytes_
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # 0-d numpy array
        return _to_str(value.item(), field)
    raise TypeError(f"tfds field {field!r} is {type(value).__name__}, not text")


class TfdsTextSource(Sequence[str]):
    """A tfds data source viewed as a sequence of ``str`` (one field of each example).

    ``len`` and integer / slice indexing are random access; slices and ``__getitems__`` fetch in
    one batched read.
    """

    def __init__(self, source: Any, field: str = "text", description: str = "") -> None:
        self.source = source
        self.field = field
        self.description = description or repr(source)
        self._path = field.split("/")

    def _text(self, example: Any) -> str:
        value = example
        for key in self._path:
            if not isinstance(value, dict) or key not in value:
                have = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise KeyError(f"{self.description}: no field {self.field!r} (example has {have})")
            value = value[key]
        return _to_str(value, self.field)

    def __len__(self) -> int:
        return len(self.source)

    def _index(self, i: int) -> int:
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for {self.description} of length {n}")
        return j

    @overload
    def __getitem__(self, key: int) -> str: ...

    @overload
    def __getitem__(self, key: slice) -> list[str]: ...

    def __getitem__(self, key: int | slice) -> str | list[str]:
        if isinstance(key, slice):
            return self.__getitems__(range(*key.indices(len(self))))
        return self._text(self.source[self._index(int(key))])

    def __getitems__(self, keys: Sequence[int]) -> list[str]:
        keys = [self._index(int(k)) for k in keys]
        if not keys:
            return []
        return [self._text(ex) for ex in self.source.__getitems__(keys)]

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"TfdsTextSource({self.description}, field={self.field!r}, len={len(self)})"


def prepared_data_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                         builder_kwargs: dict[str, Any] | None = None) -> Any:
    """``tfds.data_source`` of an already prepared dataset, read from its files first.

    tfds prefers a registered builder's code over the prepared files, and some builders' code
    needs TensorFlow just to describe their features (``super_glue`` uses ``tf.int32``); whether
    that code is registered depends on unrelated packages (tfds registers its catalog only when
    ``h5py`` imports). Reading ``dataset_info.json`` and the shards directly never touches it.
    Falls back to ``tfds.data_source`` (builder code) when no prepared files are found.
    """
    tfds = require("tensorflow_datasets", "a tfds: data source")  # lazy: paid for only when used
    from tensorflow_datasets.core import read_only_builder, registered

    data_dir = None if data_dir is None else os.fspath(data_dir)
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir, **(builder_kwargs or {}))
    except registered.DatasetNotFoundError:
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                    builder_kwargs=builder_kwargs)
        except registered.DatasetNotFoundError:  # its message lists the whole catalogue
            where = data_dir or "tfds's default data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
            raise FileNotFoundError(
                f"tfds:{name}: no prepared dataset of that name in {where}, and tfds knows no "
                "builder by that name; prepare it first (builder.download_and_prepare("
                "file_format='array_record'))") from None
    return builder.as_data_source(split=split)


def tfds_texts(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    field: str = "text",
    *,
    download: bool = False,
    builder_kwargs: dict[str, Any] | None = None,
) -> TfdsTextSource:
    """Random-access ``str`` view of field ``field`` of tfds dataset ``name`` / ``split``.

    Built on ``tfds.data_source`` (array_record, no TensorFlow). ``download=False`` by default:
    the dataset must already be prepared under ``data_dir`` (for example with
    ``builder.download_and_prepare(file_format="array_record")``); a dataset whose builder code is
    not registered is still read from its files (``dataset_info.json`` + shards). ``split`` accepts
    tfds slicing (``"train[:1%]"``).
    """
    tfds = require("tensorflow_datasets", "a tfds: data source")  # lazy: paid for only when used

    if download:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=True,
            builder_kwargs=builder_kwargs,
            download_and_prepare_kwargs={"file_format": "array_record"},
        )
    else:
        source = prepared_data_source(name, split, data_dir, builder_kwargs)
    return TfdsTextSource(source, field=field, description=f"tfds {name}[{split}]")
