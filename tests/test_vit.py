"""ViT forward: parity with onnxruntime on the real DINOv2-small weights, masked == sliced,
LoRA semantics, the group declaration and the nnx wrapper."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraprune_jax.core.groups import declared_masks
from loraprune_jax.models import vit
from loraprune_jax.core.lora import merge_pair

HD = 8  # head width of the tiny model
TINY = dict(dim=32, depth=3, heads=4, ffn=24, patch=4, image_size=16, head_dim=HD)


def tiny(key: int = 0) -> dict:
    return vit.init_vit(key, std=0.2, **TINY)


def images(key: int = 1, n: int = 2, size: int = 16) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(key), (n, size, size, 3))


_forward = jax.jit(vit.forward, static_argnames=("head_dim",))


def run(params, x, lora=None, masks=None, scale=1.0):
    return _forward(params, x, lora, masks, scale, head_dim=HD)


# ----------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def onnx_backbone(vit_s):
    """``(params, onnxruntime session exposing the backbone's final LayerNorm, output name)``;
    the params are conftest's ``vit_s`` (``load_vit_s()`` of the bundled file, once per session)."""
    import onnx
    import onnxruntime as ort

    from loraprune_jax.io.onnx_vit import bundled_vit_path

    params = vit_s
    model = onnx.load(str(bundled_vit_path()))
    # the backbone's final LayerNorm ends in the Add that reads backbone.layernorm.bias
    (name,) = [n.output[0] for n in model.graph.node if "backbone.layernorm.bias" in n.input]
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return params, session, name


@pytest.mark.slow
def test_forward_matches_onnxruntime(onnx_backbone):
    params, session, name = onnx_backbone
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)  # NCHW, as ONNX
    (want,) = session.run([name], {"input_image": x})
    got = np.asarray(jax.jit(vit.forward)(params, x.transpose(0, 2, 3, 1)))
    assert got.shape == want.shape == (2, 257, 384)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-3 * scale
    feats = np.asarray(jax.jit(vit.features)(params, x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(feats, got[:, 0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- masks and slicing
def slice_layer(layer: dict, heads: np.ndarray, channels: np.ndarray) -> dict:
    """Keep the listed heads and MLP channels of one layer, by hand."""
    cols = (heads[:, None] * HD + np.arange(HD)).reshape(-1).astype(int)
    out = dict(layer)
    for n in ("q", "k", "v"):
        out[n] = layer[n][:, cols]
        out[f"{n}_bias"] = layer[f"{n}_bias"][cols]
    out["o"] = layer["o"][cols, :]
    out["fc1"] = layer["fc1"][:, channels]
    out["fc1_bias"] = layer["fc1_bias"][channels]
    out["fc2"] = layer["fc2"][channels, :]
    return out


@pytest.mark.slow
def test_masked_equals_sliced():
    params = tiny()
    keep_heads = [np.array([0, 2]), np.array([], int), np.array([0, 1, 2, 3])]  # layer 1: no heads
    keep_mlp = [np.arange(0, 24, 2), np.array([3, 4, 5]), np.array([], int)]  # layer 2: no MLP
    masks = {"layers": []}
    for h, c in zip(keep_heads, keep_mlp):
        masks["layers"].append({
            "attn": jnp.zeros(4).at[h].set(1.0),
            "mlp": jnp.zeros(24).at[c].set(1.0),
        })  # fmt: skip
    sliced = dict(params)
    sliced["layers"] = [slice_layer(l, h, c) for l, h, c in zip(params["layers"], keep_heads, keep_mlp)]
    assert [vit.widths(sliced, i, HD) for i in range(3)] == [(2, 12), (0, 3), (4, 0)]
    x = images()
    masked_out, sliced_out = run(params, x, masks=masks), run(sliced, x)
    np.testing.assert_allclose(masked_out, sliced_out, rtol=1e-5, atol=1e-5)
    assert not np.allclose(masked_out, run(params, x), atol=1e-3)  # the masks do something
    ones = declared_masks(vit.declaration(params, HD))
    np.testing.assert_allclose(run(params, x, masks=ones), run(params, x), rtol=1e-6, atol=1e-6)


def test_declaration_slices_like_by_hand():
    params = tiny()
    decl = vit.declaration(params, HD)
    assert len(decl) == 3 and decl[0]["attn"].size == 4 and decl[0]["mlp"].size == 24
    keep = {"attn": np.array([1, 3]), "mlp": np.array([0, 5, 7])}
    for i, kinds in enumerate(decl):
        layer = dict(params["layers"][i])
        for kind, spec in kinds.items():
            for c in spec.couplings:
                assert c.path[:2] == ("layers", i)
                arr = np.asarray(params["layers"][i][c.path[2]])
                assert arr.shape[c.axis] == spec.size * c.width
                idx = (keep[kind][:, None] * c.width + np.arange(c.width)).reshape(-1)
                layer[c.path[2]] = np.take(arr, idx, axis=c.axis)
        want = slice_layer(params["layers"][i], keep["attn"], keep["mlp"])
        assert set(layer) == set(want)
        for k in want:
            np.testing.assert_array_equal(layer[k], want[k], err_msg=k)
    coupled = {c.path[2] for k in decl[0].values() for c in k.couplings}
    assert coupled == {"q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "fc1", "fc1_bias", "fc2"}


# ----------------------------------------------------------------------------- LoRA
def test_lora_zero_b_equals_base_and_random_b_equals_merged():
    params = tiny()
    lora = vit.init_vit_lora(jax.random.PRNGKey(3), params, rank=4)
    assert set(lora["layers"][0]) == set(vit.LORA_TARGETS)
    assert lora["layers"][0]["fc1"]["a"].shape == (32, 4) and lora["layers"][0]["fc1"]["b"].shape == (4, 24)
    x = images()
    np.testing.assert_allclose(run(params, x, lora, scale=2.0), run(params, x), rtol=1e-6, atol=1e-6)

    keys = iter(jax.random.split(jax.random.PRNGKey(4), 64))
    lora = jax.tree_util.tree_map_with_path(
        lambda p, a: 0.3 * jax.random.normal(next(keys), a.shape) if p[-1].key == "b" else a, lora
    )
    merged = dict(params)
    merged["layers"] = [
        {**l, **{n: merge_pair(l[n], pair, 2.0) for n, pair in a.items()}}
        for l, a in zip(params["layers"], lora["layers"])
    ]
    got = run(params, x, lora, scale=2.0)
    np.testing.assert_allclose(got, run(merged, x), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, run(params, x), atol=1e-3)


def test_lora_gradients_and_dropout():
    params = tiny()
    lora = vit.init_vit_lora(jax.random.PRNGKey(0), params, rank=2, targets=("q", "fc2"))
    x = images()

    def loss(lo, rng=None):
        return jnp.sum(vit.features(params, x, lo, None, 1.0, head_dim=HD, lora_dropout=0.5, rng=rng) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(lora, jax.random.PRNGKey(1))
    assert set(grads["layers"][0]) == {"q", "fc2"}
    assert float(jnp.abs(grads["layers"][0]["q"]["b"]).sum()) > 0  # B gets gradient while zero
    assert np.isclose(value, jax.jit(loss)(lora))  # B = 0: dropout is invisible
    with pytest.raises(ValueError, match="unknown ViT LoRA targets"):
        vit.init_vit_lora(jax.random.PRNGKey(0), params, targets=("gate",))


# ----------------------------------------------------------------------------- misc
@pytest.mark.slow
def test_shapes_and_bad_inputs():
    params = tiny()
    out = run(params, images(n=3))
    assert out.shape == (3, 17, 32)
    assert vit.features(params, images(n=3), head_dim=HD).shape == (3, 32)
    with pytest.raises(ValueError, match="position table"):
        run(params, images(size=20))
    with pytest.raises(ValueError, match="tile"):
        run(params, images(size=18))
    with pytest.raises(ValueError, match="NHWC"):
        run(params, jnp.zeros((16, 16, 3)))


def test_patch_embed_is_a_strided_conv():
    params = tiny()
    x = images()
    k, b = params["patch"]["kernel"], params["patch"]["bias"]
    conv = jax.lax.conv_general_dilated(x, k, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(
        vit.patch_embed(x, k, b), (conv + b).reshape(2, 16, 32), rtol=1e-5, atol=1e-5
    )


def test_nnx_wrapper_round_trips():
    params = tiny()
    model = vit.ViT(params, head_dim=HD)
    back = model.params()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    np.testing.assert_array_equal(back["layers"][2]["fc2"], params["layers"][2]["fc2"])
    np.testing.assert_allclose(model(images()), run(params, images()), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_per_example_gates_split_the_mask_gradient():
    """Masks with a batch axis gate each example on its own: at the mask values the features are
    unchanged and the per-example gradients sum to the gradient of the shared masks."""
    from loraprune_jax.core.gates import init_gates

    params, x = tiny(), images(n=3)
    masks = declared_masks(vit.declaration(params, HD))
    masks["layers"][1]["attn"] = masks["layers"][1]["attn"].at[2].set(0.0)

    @jax.jit
    @jax.grad
    def grad_total(m, images=x):
        return jnp.sum(vit.features(params, images, masks=m, head_dim=HD) ** 2)

    gates = init_gates(masks, 3)
    np.testing.assert_allclose(run(params, x, masks=gates), run(params, x, masks=masks), rtol=1e-6)
    shared, per_example = grad_total(masks), grad_total(gates)
    for a, b in zip(jax.tree.leaves(per_example), jax.tree.leaves(shared)):
        assert a.shape == (3, *b.shape)
        np.testing.assert_allclose(np.asarray(a).sum(axis=0), np.asarray(b), rtol=1e-4, atol=1e-5)
    one = grad_total(masks, x[:1])
    np.testing.assert_allclose(per_example["layers"][0]["mlp"][0], one["layers"][0]["mlp"],
                               rtol=1e-4, atol=1e-5)
