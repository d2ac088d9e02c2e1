"""Tokenizers: rebuilt from GGUF metadata, or loaded from a HF checkpoint directory.

GGUF files carry the whole tokenizer as metadata (``tokenizer.ggml.*``), so the bundled
SmolLM2 model needs no network access: we rebuild the equivalent HF fast tokenizer with the
``tokenizers`` library and wrap it in :class:`transformers.PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraprune_jax.extras import require

if TYPE_CHECKING:  # imported where used: the hf and gguf extras
    import gguf
    import transformers
from loraprune_jax.io.errors import CheckpointError

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user defined,
# 5 unused, 6 byte.
_CONTROL = 3
_USER_DEFINED = 4

# llama.cpp pre-tokenizer names (``tokenizer.ggml.pre``) -> does it split digits one by one
# before the GPT-2 byte-level regex? These share llama.cpp's "starcoder" pre-tokenizer type,
# which is exactly HF's Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
_DIGITS_THEN_BYTELEVEL = ("smollm", "starcoder", "refact", "codeshell")
_BYTELEVEL_ONLY = ("gpt-2", "gpt2", "default")

# Files whose presence means a HF directory ships a tokenizer.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
)


def _reader_and_path(reader_or_path: gguf.GGUFReader | str | os.PathLike[str]):
    gguf = require("gguf", "reading a GGUF tokenizer")
    if isinstance(reader_or_path, gguf.GGUFReader):
        reader = reader_or_path
        path = getattr(reader.data, "filename", None) or "<GGUF reader>"
        return reader, os.fspath(path)
    path = Path(reader_or_path)
    if not path.is_file():
        raise CheckpointError(path, "GGUF file not found")
    try:
        return gguf.GGUFReader(path), os.fspath(path)
    except Exception as e:  # GGUFReader raises ValueError/struct.error/IndexError...
        raise CheckpointError(path, f"not a readable GGUF file (truncated or corrupt?): {e}") from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf(
    reader_or_path: gguf.GGUFReader | str | os.PathLike[str],
) -> transformers.PreTrainedTokenizerFast:
    """Build the HF fast tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

    Supports byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with the GPT-2 or the
    SmolLM/StarCoder (digits split individually) pre-tokenizer. Control tokens become special
    added tokens; BOS/EOS are only added by ``encode`` when the file says so
    (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``). Raises :class:`CheckpointError`
    naming the file for anything else, rather than silently tokenizing differently.
    """
    tokenizers = require("tokenizers", "building a tokenizer")
    transformers = require("transformers", "a tokenizer")
    from tokenizers import decoders, models, pre_tokenizers, processors

    reader, path = _reader_and_path(reader_or_path)
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise CheckpointError(path, "no tokenizer metadata (tokenizer.ggml.model is missing)")
    if model != "gpt2":
        raise CheckpointError(
            path, f"unsupported tokenizer model {model!r} (only byte-level BPE 'gpt2' is supported)"
        )
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_BYTELEVEL:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _BYTELEVEL_ONLY:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise CheckpointError(
            path,
            f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} "
            f"(supported: {sorted(_DIGITS_THEN_BYTELEVEL + _BYTELEVEL_ONLY)})",
        )

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens:
        raise CheckpointError(path, "tokenizer.ggml.tokens is missing or empty")
    if merges is None:
        raise CheckpointError(path, "tokenizer.ggml.merges is missing (needed for BPE)")
    token_types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise CheckpointError(
            path, f"{len(token_types)} token types for {len(tokens)} tokens in tokenizer metadata"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError(path, "tokenizer.ggml.tokens contains duplicate tokens")
    merge_pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(path, f"malformed BPE merge {m!r} (expected 'left right')")
        merge_pairs.append((parts[0], parts[1]))

    tok = tokenizers.Tokenizer(
        models.BPE(vocab, merge_pairs, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, token_types)
            if int(ty) == _CONTROL
        ]
    )
    user = [t for t, ty in zip(tokens, token_types) if int(ty) == _USER_DEFINED]
    if user:
        tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if idx is None:
            return None
        if not 0 <= int(idx) < len(tokens):
            raise CheckpointError(path, f"tokenizer.ggml.{key}_token_id={idx} is out of range")
        return tokens[int(idx)]

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise CheckpointError(path, "add_bos/add_eos_token is set but the token id is missing")
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        special = [(t, vocab[t]) for t in dict.fromkeys([bos] * add_bos + [eos] * add_eos)]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    kwargs: dict[str, Any] = {}
    context = _field(reader, f"{_field(reader, 'general.architecture', 'llama')}.context_length")
    if context:
        kwargs["model_max_length"] = int(context)
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template:
        kwargs["chat_template"] = chat_template
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def has_hf_tokenizer(path: str | os.PathLike[str]) -> bool:
    """Whether a HF checkpoint directory ships tokenizer files."""
    return any((Path(path) / f).is_file() for f in HF_TOKENIZER_FILES)


def load_hf_tokenizer(path: str | os.PathLike[str]) -> Any | None:
    """The tokenizer of a local HF directory, or None without tokenizer files.

    A ``tokenizer.json`` is loaded as a fast tokenizer directly, without resolving the model
    type: a pruned export's ``config.json`` names remote modeling code, which a tokenizer does
    not need (``AutoTokenizer`` would ask to trust it). Otherwise ``AutoTokenizer``. Local files
    only: a checkpoint directory must be self-contained (no network at load time).
    """
    if not has_hf_tokenizer(path):
        return None
    transformers = require("transformers", "loading a HF tokenizer")
    try:
        if (Path(path) / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast.from_pretrained(
                os.fspath(path), local_files_only=True
            )
        return transformers.AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(path, f"could not load the tokenizer: {e}") from e
