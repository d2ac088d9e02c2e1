"""Tokenizers rebuilt from GGUF metadata: the bundled SmolLM2 one and hand-made error cases."""

from __future__ import annotations

import gguf
import pytest
from tokenizers import pre_tokenizers

from loraprune_jax.io import CheckpointError, bundled_gguf_path, load_hf_tokenizer, tokenizer_from_gguf

TEXTS = [
    "Hello, world! The year 2024 had 366 days.",
    "  leading spaces\tand tabs\nnew lines  ",
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🤗🚀",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n",
]


@pytest.fixture(scope="module")
def smollm2_tok():
    return tokenizer_from_gguf(bundled_gguf_path())


def test_no_bos(smollm2_tok):
    ids = smollm2_tok.encode("Hello")
    assert ids and ids[0] != smollm2_tok.bos_token_id
    assert smollm2_tok("Hello")["input_ids"] == ids
    assert smollm2_tok.bos_token == "<|im_start|>" and smollm2_tok.bos_token_id == 1
    assert smollm2_tok.eos_token == "<|im_end|>" and smollm2_tok.eos_token_id == 2
    assert smollm2_tok.unk_token == "<|endoftext|>" and smollm2_tok.pad_token_id == 2
    assert len(smollm2_tok) == 49152


def test_digits_split(smollm2_tok):
    ids = smollm2_tok.encode("12345")
    assert len(ids) == 5
    assert smollm2_tok.convert_ids_to_tokens(ids) == list("12345")


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(smollm2_tok, text):
    assert smollm2_tok.decode(smollm2_tok.encode(text)) == text


def test_special_tokens(smollm2_tok):
    assert smollm2_tok.encode("<|im_start|>") == [1]
    ids = smollm2_tok.encode("<|im_start|>assistant<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert "<|im_start|>" in smollm2_tok.all_special_tokens
    assert smollm2_tok.decode(ids, skip_special_tokens=True) == "assistant"
    # The chat template travels along.
    text = smollm2_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


def test_save_and_reload(smollm2_tok, tmp_path):
    smollm2_tok.save_pretrained(tmp_path)
    tok = load_hf_tokenizer(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == smollm2_tok.encode(text)
    assert load_hf_tokenizer(tmp_path / "nothing_here") is None


def write_tokenizer_gguf(path, *, model="gpt2", pre="smollm", merges=("h i",), add_bos=False):
    vocab = ["<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["hi"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_types([3, 3] + [1] * (len(vocab) - 2))
    w.add_token_merges(list(merges))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return vocab


def test_tiny_gguf_tokenizer(tmp_path):
    path = tmp_path / "tok.gguf"
    vocab = write_tokenizer_gguf(path)
    tok = tokenizer_from_gguf(path)
    assert tok.encode("hi 7") == [vocab.index("hi"), vocab.index("Ġ"), vocab.index("7")]
    assert tok.decode(tok.encode("hi ü")) == "hi ü"
    # add_bos_token is honoured when set.
    path2 = tmp_path / "bos.gguf"
    write_tokenizer_gguf(path2, add_bos=True)
    assert tokenizer_from_gguf(gguf.GGUFReader(path2)).encode("hi") == [0, vocab.index("hi")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "llama"}, "unsupported tokenizer model 'llama'"),
        ({"pre": "qwen2"}, "unsupported pre-tokenizer"),
        ({"merges": ("a b c",)}, "malformed BPE merge"),
    ],
)
def test_tokenizer_errors(tmp_path, kwargs, match):
    path = tmp_path / "bad_tok.gguf"
    write_tokenizer_gguf(path, **kwargs)
    with pytest.raises(CheckpointError, match=match) as err:
        tokenizer_from_gguf(path)
    assert "bad_tok.gguf" in str(err.value)


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="absent.gguf"):
        tokenizer_from_gguf(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        tokenizer_from_gguf(junk)
