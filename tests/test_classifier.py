"""Classifier pruning (ViT + head, CNN): the LLaMA machinery on declared groups, end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from loraprune_jax.config import ClassifierConfig, PruneConfig, TrainConfig
from loraprune_jax.models import vit
from loraprune_jax.core.masks import num_to_prune
from loraprune_jax.run.classifier import run_classifier
from loraprune_jax.train.classifier import cnn_family, vit_family


def tiny_vit():
    return vit.init_vit(0, dim=32, depth=4, heads=4, ffn=24, image_size=28, std=0.3)


def digits(n, seed):
    """Images whose class is readable (a bright band at a label-dependent row)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, 2 * label + 4: 2 * label + 7] = 255
    return x, y


def run_tiny(tmp_path, criterion="lora", ratio=0.5, steps=12, name="run"):
    (xtr, ytr), (xte, yte) = digits(48, 0), digits(20, 1)
    cfg = ClassifierConfig(model="vit-s", out=str(tmp_path / name), eval_batch=8,
                           prune=PruneConfig(ratio=ratio, criterion=criterion, prune_every=2),
                           train=TrainConfig(steps=steps, micro_batch_size=8, lr=3e-3))
    data = {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}
    logs = []
    metrics = run_classifier(cfg, family=vit_family(tiny_vit, image_size=28), data=data, log=logs.append)
    return cfg, metrics, logs


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["lora", "magnitude", "random", "fisher", "taylor"])
def test_tiny_vit_prunes_and_slices(tmp_path, criterion):
    cfg, m, logs = run_tiny(tmp_path, criterion)
    # only the last layer is excluded (the first 10% of 4 layers rounds down to none)
    assert m["groups_kept"]["attn_kept"] == [4 - num_to_prune(4, 0.5)] * 3 + [4]
    assert m["groups_kept"]["mlp_kept"] == [24 - num_to_prune(24, 0.5)] * 3 + [24]
    assert m["masked_vs_sliced_max_abs"] < 1e-4  # the masked model is the sliced one
    assert m["accuracy"] == m["masked_accuracy"]
    assert m["params_after"] < m["params"]
    assert [h["step"] for h in m["history"]] == list(range(1, 13))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["accuracy"] == m["accuracy"]
    assert ClassifierConfig.from_dict(json.loads((tmp_path / "run" / "run_config.json").read_text())) == cfg
    masks = np.load(tmp_path / "run" / "masks.npz")
    assert int(masks["1/attn"].sum()) == 2 and masks["3/mlp"].shape == (24,)
    assert any("accuracy" in line for line in logs)


@pytest.mark.slow
def test_tiny_vit_learns_the_task_without_pruning(tmp_path):
    _, m, _ = run_tiny(tmp_path, ratio=0.0, steps=30)
    assert m["params_after"] == m["params"]
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]
    assert m["accuracy"] > 0.3  # 10 classes: chance is 0.1


def test_refuses_existing_out_and_bad_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        run_classifier(ClassifierConfig(out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="not available"):
        ClassifierConfig(prune=PruneConfig(criterion="vanilla"))
    with pytest.raises(ValueError, match="unknown classifier model"):
        ClassifierConfig(model="resnet")
    with pytest.raises(ValueError, match="unknown classifier data"):
        ClassifierConfig(data="imagenet")


@pytest.mark.slow
def test_real_cnn_on_twenty_cifar_images(tmp_path):
    """The bundled CIFAR-10 CNN, distilled from itself while 30% of its channels go: the sliced
    model equals the masked one and the metrics count the channels and the agreement."""
    cfg = ClassifierConfig(model="cifar10-cnn", out=str(tmp_path / "cnn"), eval_batch=20,
                           prune=PruneConfig(ratio=0.3, prune_every=2),
                           train=TrainConfig(steps=6, micro_batch_size=20, lr=1e-3))
    m = run_classifier(cfg, family=cnn_family())
    assert m["dense_accuracy"] >= 0.9
    assert m["groups_kept"]["channels_kept"] == [64 - 19, 64 - 19, 128 - 38, 128 - 38, 64 - 19, 64]
    assert m["masked_vs_sliced_max_abs"] < 1e-3
    assert 0.0 <= m["agreement_with_dense"] <= 1.0 and m["test_images"] == 20
    assert m["params_after"] < m["params"]
