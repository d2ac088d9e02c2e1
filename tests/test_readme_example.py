"""The README's "Prune your own Flax model" example runs as written, on a flax.nnx model that is
not ours, and prunes it for real: the masked model equals its sliced one."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def example_source() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Prune your own Flax model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one Python example"
    return blocks[0]


def test_example_is_short():
    assert len(example_source().strip().splitlines()) < 40


def test_example_prunes_an_nnx_model(capsys):
    ns: dict = {}
    exec(compile(example_source(), "README example", "exec"), ns)
    out = capsys.readouterr().out
    assert re.fullmatch(r"loss \d+\.\d{4}; fc1 \(16, 32\), fc2 \(32, 4\)\n", out), out
    masks, small, lora, frozen = ns["masks"], ns["small"], ns["lora"], ns["frozen"]
    kept = np.asarray(masks["layers"][0]["hidden"])
    assert kept.sum() == 32 and set(np.unique(kept)) == {0.0, 1.0}  # half the channels, 0/1 masks
    x = ns["x"]
    # the masked model through flax's own forward pass ...
    f, l = ns["core"].apply_masks(frozen, masks, ns["declaration"], lora, ns["core"].NNX)
    masked_out = np.asarray(ns["nnx"].merge(ns["graphdef"], l, f)(x))
    # ... equals the sliced, merged weights as a plain two-layer MLP with 32 hidden channels
    h = jax.nn.gelu(x @ small["fc1"]["kernel"] + small["fc1"]["bias"])
    sliced_out = np.asarray(h @ small["fc2"]["kernel"] + small["fc2"]["bias"])
    np.testing.assert_allclose(masked_out, sliced_out, rtol=1e-4, atol=1e-5)
    # training worked: the pruned model fits better than the untrained dense one did
    dense = ns["MLP"](ns["nnx"].Rngs(0))
    first_loss = float(jnp.mean((dense(x) - ns["y"]) ** 2))
    assert float(ns["value"]) < 0.5 * first_loss
    # the frozen weights never changed; only LoRA trained
    graphdef, lora0, frozen0 = ns["nnx"].split(dense, ns["nnx"].LoRAParam, ...)
    jax.tree.map(np.testing.assert_array_equal, ns["nnx"].to_pure_dict(frozen0), frozen)
