"""HF export (plain LLaMA and per-layer widths with remote code) and adapter save/load."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from conftest import noisy_norms, randomize_b, tiny_config
from loraprune_jax.config import LoraConfig
from loraprune_jax.io import export as export_mod
from loraprune_jax.io.export import (
    export_hf,
    load_adapters,
    load_adapters_config,
    needs_remote_code,
    save_adapters,
)
from loraprune_jax.io.hf import load_hf_dir
from loraprune_jax.models.llama import forward
from loraprune_jax.models.llama_params import init_base, stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.models.llama_pruning import slice_and_merge

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
REMOTE_FILES = {"configuration_pruned_llama.py", "modeling_pruned_llama.py"}


def tiny_tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def load_remote(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info[key])
    return model.eval()


def pruned_model(kind, tied, num_layers=5):
    """A per-layer-width model: layer 1 without heads, layer 2 without MLP, layer 3 partial."""
    cfg = tiny_config(kind, tied, num_layers=num_layers)
    base = noisy_norms(init_base(cfg, 0, std=0.2))
    masks = init_masks(cfg)
    masks["layers"][1]["attn"] = jnp.zeros_like(masks["layers"][1]["attn"])
    masks["layers"][2]["mlp"] = jnp.zeros_like(masks["layers"][2]["mlp"])
    masks["layers"][3]["attn"] = masks["layers"][3]["attn"].at[0].set(0.0)
    masks["layers"][3]["mlp"] = masks["layers"][3]["mlp"].at[jnp.array([0, 5, 9])].set(0.0)
    return cfg, base, masks


@pytest.mark.parametrize("tied", [True, False])
def test_uniform_export_is_plain_llama(kind, tied, tokens, tmp_path):
    cfg = tiny_config(kind, tied)
    base = noisy_norms(init_base(cfg, 0, std=0.2))
    assert not needs_remote_code(cfg)
    out = export_hf(tmp_path / "m", cfg, stack_layers(base), tiny_tokenizer())
    files = set(os.listdir(out))
    assert not files & REMOTE_FILES
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama" and "auto_map" not in hf_cfg
    assert "layer_num_heads" not in hf_cfg

    ref = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded_cfg, loaded, tok = load_hf_dir(out)
    assert loaded_cfg == cfg and tok is not None
    want = np.asarray(forward(loaded, None, None, tokens, loaded_cfg))
    np.testing.assert_allclose(torch_logits(ref, tokens), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_per_layer_export_loads_with_remote_code(kind, tied, tokens, tmp_path):
    cfg, base, masks = pruned_model(kind, tied)
    small, small_cfg = slice_and_merge(base, None, masks, cfg)
    assert needs_remote_code(small_cfg)
    out = export_hf(tmp_path / "pruned", small_cfg, small, tiny_tokenizer())
    assert REMOTE_FILES <= set(os.listdir(out))
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama"  # known to transformers: no question, no warning
    assert hf_cfg["architectures"] == ["PrunedLlamaForCausalLM"]
    assert set(hf_cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert hf_cfg["layer_num_heads"][1] == 0 and hf_cfg["layer_intermediate_size"][2] == 0

    loaded_cfg, loaded, tok = load_hf_dir(out)
    assert loaded_cfg == small_cfg
    assert tok is not None  # the tokenizer loads despite the custom model_type
    model = load_remote(out)
    assert type(model).__name__ == "PrunedLlamaForCausalLM"
    attn1 = model.model.layers[1].self_attn
    assert attn1.q_proj.weight.shape == (0, cfg.hidden_size)
    attn3 = model.model.layers[3].self_attn
    assert attn3.num_key_value_groups == cfg.num_heads // cfg.num_kv_heads
    assert attn3.k_proj.weight.shape[0] == (cfg.num_kv_heads - 1) * cfg.head_dim
    assert model.model.layers[2].mlp.down_proj.weight.shape == (cfg.hidden_size, 0)
    want = np.asarray(forward(loaded, None, None, tokens, loaded_cfg))
    np.testing.assert_allclose(torch_logits(model, tokens), want, atol=1e-4, rtol=1e-4)


def test_uniform_heads_not_dividing_hidden_size_use_remote_code(tokens, tmp_path):
    # 3 heads of 8 in a 40-wide model: transformers 5's LlamaConfig refuses 40 % 3 != 0.
    cfg = tiny_config("mha", hidden_size=40)
    base = noisy_norms(init_base(cfg, 0, std=0.2))
    masks = init_masks(cfg)
    for layer in masks["layers"]:
        layer["attn"] = layer["attn"].at[2].set(0.0)
    small, small_cfg = slice_and_merge(base, None, masks, cfg)
    assert small_cfg.is_uniform and small_cfg.num_heads == 3
    assert needs_remote_code(small_cfg)
    out = export_hf(tmp_path / "m", small_cfg, small)
    model = load_remote(out)
    loaded_cfg, loaded, _ = load_hf_dir(out)
    assert loaded_cfg.heads(0) == 3
    want = np.asarray(forward(loaded, None, None, tokens, loaded_cfg))
    np.testing.assert_allclose(torch_logits(model, tokens), want, atol=1e-4, rtol=1e-4)


def test_generate_with_cache_when_first_layer_has_no_heads(tokens, tmp_path):
    cfg = tiny_config("gqa", num_layers=3)
    base = noisy_norms(init_base(cfg, 0, std=0.2))
    masks = init_masks(cfg)
    masks["layers"][0]["attn"] = jnp.zeros_like(masks["layers"][0]["attn"])
    small, small_cfg = slice_and_merge(base, None, masks, cfg)
    model = load_remote(export_hf(tmp_path / "m", small_cfg, small))
    prompt = torch.tensor(tokens[:1, :5], dtype=torch.long)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    seq = prompt
    for _ in range(6):  # greedy decoding without a cache, from full forward passes
        with torch.no_grad():
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert cached.tolist() == seq.tolist()
    # incremental decoding by hand: positions come from the cache's length (read from layer 0)
    full = torch_logits(model, tokens[:1])
    cache = transformers.DynamicCache(config=model.config)
    step = torch.tensor(tokens[:1], dtype=torch.long)
    with torch.no_grad():
        parts = [model(step[:, :5], cache=cache, use_cache=True).logits]
        assert cache.get_seq_length() == 5
        for t in range(5, step.shape[1]):
            parts.append(model(step[:, t : t + 1], cache=cache, use_cache=True).logits)
    np.testing.assert_allclose(torch.cat(parts, 1).numpy(), full, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_end_to_end_masked_lora_to_torch(kind, tokens, tmp_path):
    cfg, base, masks = pruned_model(kind, tied=False)
    rs = np.random.RandomState(4)
    masks["layers"][2]["attn"] = masks["layers"][2]["attn"].at[rs.randint(cfg.num_kv_heads)].set(0.0)
    lora = randomize_b(init_lora(jax.random.PRNGKey(2), base, LORA))
    want = np.asarray(forward(base, lora, masks, tokens, cfg, LORA))
    small, small_cfg = slice_and_merge(stack_layers(base), stack_layers(lora), stack_layers(masks), cfg, LORA)
    model = load_remote(export_hf(tmp_path / "final", small_cfg, small))
    np.testing.assert_allclose(torch_logits(model, tokens), want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - np.asarray(forward(base, None, masks, tokens, cfg))).max() > 1e-3


def test_export_refuses_existing_dir_and_clashing_extra_files(tmp_path):
    cfg = tiny_config("gqa")
    base = init_base(cfg, 0)
    out = export_hf(tmp_path / "m", cfg, base, extra_files={"README.md": "hi\n"})
    assert (out / "README.md").read_text() == "hi\n"
    with pytest.raises(FileExistsError):
        export_hf(out, cfg, base)
    export_hf(out, cfg, base, overwrite=True)
    assert not (out / "README.md").exists()
    with pytest.raises(ValueError, match="config.json"):
        export_hf(tmp_path / "x", cfg, base, extra_files={"config.json": "{}"})
    assert not (tmp_path / "x").exists()


def _leftovers(parent):
    return [p for p in os.listdir(parent) if p.startswith(".")]


def test_export_failure_leaves_nothing(tmp_path):
    cfg, base, masks = pruned_model("gqa", True)
    small, small_cfg = slice_and_merge(base, None, masks, cfg)

    class DiskFullTokenizer:  # fails after config.json and the weights are written
        def save_pretrained(self, directory):
            assert os.listdir(directory)  # the half-written export is there
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_hf(tmp_path / "m", small_cfg, small, DiskFullTokenizer())
    assert not (tmp_path / "m").exists()
    assert _leftovers(tmp_path) == []


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("stacked", [False, True])
def test_adapters_round_trip(stacked, tmp_path):
    cfg, base, masks = pruned_model("gqa", True)
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    lora = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lora)
    if stacked:
        lora, masks = stack_layers(lora), stack_layers(masks)
    out = save_adapters(tmp_path / "run", lora, masks, LORA, cfg)
    assert {"lora.safetensors", "masks.safetensors", "adapters.json"} == set(os.listdir(out))
    from safetensors import safe_open

    with safe_open(out / "lora.safetensors", "np") as f:
        assert "layers.3.q.a" in f.keys() and "layers.0.down.b" in f.keys()
    lora2, masks2, lora_cfg2 = load_adapters(out)
    assert lora_cfg2 == LORA
    assert load_adapters_config(out) == cfg
    assert_trees_equal(lora2, lora)
    assert_trees_equal(masks2, masks)


def test_adapters_optional_parts_and_overwrite(tmp_path):
    cfg = tiny_config("mha")
    masks = init_masks(cfg)
    out = save_adapters(tmp_path / "run", None, masks, None, cfg)
    lora2, masks2, cfg2 = load_adapters(out)
    assert lora2 is None and cfg2 is None
    assert_trees_equal(masks2, masks)
    with pytest.raises(FileExistsError):
        save_adapters(out, None, masks, None, cfg)
    masks["layers"][0]["attn"] = masks["layers"][0]["attn"].at[1].set(0.0)
    save_adapters(out, None, masks, None, cfg, overwrite=True)
    assert float(load_adapters(out)[1]["layers"][0]["attn"][1]) == 0.0
    with pytest.raises(ValueError, match="lora_cfg"):
        save_adapters(tmp_path / "bad", {"layers": []}, None, None, cfg)


def test_adapters_failure_leaves_old_contents(tmp_path, monkeypatch):
    cfg = tiny_config("gqa")
    base = init_base(cfg, 0)
    lora = init_lora(jax.random.PRNGKey(0), base, LORA)
    masks = init_masks(cfg)
    out = save_adapters(tmp_path / "run", lora, masks, LORA, cfg)
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}

    calls = []
    real_save_file = export_mod.save_file

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the masks file, after lora.safetensors was written
            raise OSError("disk full")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(export_mod, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(out, lora, masks, LORA, cfg, overwrite=True)
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        save_adapters(tmp_path / "new", lora, masks, LORA, cfg)
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path) == []


def test_load_adapters_errors(tmp_path):
    from loraprune_jax.io.errors import CheckpointError

    with pytest.raises(CheckpointError, match="adapters.json"):
        load_adapters(tmp_path)
    (tmp_path / "adapters.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_adapters(tmp_path)


LOAD_LIKE_A_HUB_MODEL = """
import sys, warnings
import transformers
warnings.simplefilter("always")
transformers.logging.set_verbosity_warning()
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
print("ids", tok("hello world")["input_ids"])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print("model", type(model).__name__, sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.parametrize("widths", ["per-layer", pytest.param("heads-not-dividing-hidden",
                                                                marks=pytest.mark.slow)])
def test_pruned_export_loads_like_a_hub_model_with_stdin_closed(tmp_path, widths):
    """AutoTokenizer with no prompt and no trust_remote_code; the model with trust_remote_code
    and no warning; nothing read from standard input."""
    import subprocess
    import sys

    if widths == "per-layer":
        cfg = tiny_config("gqa").with_widths((6, 3, 6), (2, 1, 2), (40, 20, 40))
    else:  # uniform, but 3 heads of 8 in a 40-wide model: LlamaConfig alone would refuse it
        cfg = tiny_config("mha", hidden_size=40, num_heads=3, num_kv_heads=3)
    assert needs_remote_code(cfg)
    out = export_hf(tmp_path / "pruned", cfg, init_base(cfg, 0), tiny_tokenizer())
    res = subprocess.run([sys.executable, "-c", LOAD_LIKE_A_HUB_MODEL, str(out)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ids [3, 4]" in res.stdout
    assert f"model PrunedLlamaForCausalLM {cfg.num_params()}" in res.stdout
    for unwanted in ("custom code", "[y/N]", "trust_remote_code", "model of type", "Warning"):
        assert unwanted not in res.stderr, res.stderr
    assert load_hf_dir(out)[0] == cfg  # the per-layer lists count, not the uniform fields


def test_pruned_export_tokenizer_loads_without_asking_to_trust_code(tmp_path, monkeypatch):
    cfg = tiny_config("gqa").with_widths((6, 3, 6), (2, 1, 2), (40, 20, 40))
    out = export_hf(tmp_path / "pruned", cfg, init_base(cfg, 0), tiny_tokenizer())

    def no_prompt(*args, **kwargs):
        raise AssertionError("asked whether to trust remote code")

    for module in ("tokenization_auto", "configuration_auto"):
        monkeypatch.setattr(f"transformers.models.auto.{module}.resolve_trust_remote_code", no_prompt)
    _, _, tok = load_hf_dir(out)
    assert tok is not None and tok("hello world")["input_ids"] == [3, 4]


@pytest.mark.parametrize("stacked", [False, True])
def test_weight_masked_export_keeps_shapes_zeros_and_masks(stacked, tokens, tmp_path):
    """Unstructured / N:M: merged weights with zeros in place, the masks beside them, and the
    same logits from plain transformers as from the masked, unmerged model."""
    from loraprune_jax.io.export import load_export_masks
    from loraprune_jax.models.lora import merge_lora
    from loraprune_jax.core.elements import apply_element_masks, update_nm_masks
    from loraprune_jax.models.llama_pruning import init_element_masks

    cfg = tiny_config("gqa")
    base = noisy_norms(init_base(cfg, 0, std=0.2))
    lora = randomize_b(init_lora(jax.random.PRNGKey(0), base, LORA))
    masks = init_element_masks(cfg, ("q", "k", "v", "o", "gate", "up", "down"))
    rng = np.random.RandomState(1)
    masks = update_nm_masks(masks, jax.tree.map(lambda m: rng.rand(*m.shape), masks), 1.0,
                            excluded=(0,))
    host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    merged = apply_element_masks(merge_lora(host(base), host(lora), LORA), host(masks))
    out = export_hf(tmp_path / "m", cfg, stack_layers(merged) if stacked else merged,
                    tiny_tokenizer(), masks=stack_layers(masks) if stacked else masks)
    assert "masks.safetensors" in os.listdir(out) and not needs_remote_code(cfg)
    back_masks = load_export_masks(out)
    cfg2, base2, _ = load_hf_dir(out)
    assert cfg2 == cfg
    for i in range(cfg.num_layers):
        for name in ("q", "down"):
            mk = back_masks["layers"][i][name]
            assert mk.dtype == np.uint8 and mk.shape == base2["layers"][i][name].shape
            np.testing.assert_array_equal(mk, np.asarray(masks["layers"][i][name]) != 0)
            w = np.asarray(base2["layers"][i][name])
            assert np.all(w[mk == 0] == 0) and np.count_nonzero(w) == np.count_nonzero(mk)
    assert back_masks["layers"][0]["q"].all() and not back_masks["layers"][1]["q"].all()
    want = np.asarray(forward(base, lora, masks, tokens, cfg, LORA))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(model, tokens), want, atol=5e-5, rtol=1e-4)
    # a structured export has no masks file
    assert load_export_masks(export_hf(tmp_path / "plain", cfg, base)) is None
