"""Write a LLaMA checkpoint of a real shape with random weights and a byte-level tokenizer.

    python experiments/random_checkpoint.py OUT_DIR --shape smollm2-135m [--dtype bfloat16]

For smoke runs of `loraprune-jax prune` where no real checkpoint can be fetched (a fresh GPU or
TPU machine without network): the files are what `loraprune-jax` reads from any HF LLaMA
directory, so loading, sharding, training, slicing and export all run for real; only the
perplexities are meaningless. The tokenizer maps each byte to one token (ids 0-255).
"""

from __future__ import annotations

import argparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loraprune_jax.config import LlamaConfig
from loraprune_jax.io import save_hf_dir
from loraprune_jax.models.llama_params import init_base

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                         rope_theta=1e5, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                 rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte: a byte-level BPE without merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = LlamaConfig(**SHAPES[args.shape], dtype=args.dtype)
    base = init_base(config, args.seed, std=0.02)
    save_hf_dir(args.out, config, base, byte_tokenizer())
    print(f"wrote {args.out}: {args.shape}, {config.num_params() / 1e6:.1f}M random parameters")


if __name__ == "__main__":
    main()
