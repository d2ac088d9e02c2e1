"""``loraprune-jax generate``: continuations of prompts with the KV-cache decoder, and the decoding
speed (:func:`loraprune_jax.eval.generate.generate_with_stats` does the work), on one device or
sharded over a ``--mesh`` (``--distributed``: over several processes)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .checks import POSITIVE, number, peek
from .meshargs import add_mesh_args, base_note, mesh_from_args, mesh_note


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``loraprune-jax`` subparsers."""
    p = subparsers.add_parser("generate", help="generate text with a KV cache (greedy by default)")
    p.add_argument("--model", required=True,
                   help="'smollm2', a HF LLaMA directory, or a .gguf file")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat for several; they run as one batch)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=64,
                   help="at most this many new tokens (below the model's context length)")
    p.add_argument("--temperature", type=number(float, low=0), default=0.0,
                   help="0: greedy (default)")
    p.add_argument("--top-k", type=POSITIVE, default=None,
                   help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=number(float, low=0, low_open=True, high=1), default=None,
                   help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn of the tokenizer's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    add_mesh_args(p)
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args: argparse.Namespace) -> int:
    """Print each prompt, its continuation, and the decoding speed. With ``--mesh`` the model
    is sharded and the prompts split over the devices: the same greedy continuations."""
    from ..eval.generate import generate_with_stats, load_for_generation

    # everything that can be wrong is found before the model loads: settings, model, mesh
    if args.system is not None and not args.chat:
        raise ValueError("--system is the system message of --chat; give --chat too")
    if (args.top_k is not None or args.top_p is not None) and args.temperature == 0:
        raise ValueError("--top-k and --top-p choose what to sample from: give --temperature > 0 "
                         "(0 is greedy decoding)")
    config = peek(args.model)
    if args.max_new_tokens >= config.max_position_embeddings:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be below the model's "
                         f"context length {config.max_position_embeddings}")
    if args.top_k is not None and args.top_k > config.vocab_size:
        raise ValueError(f"--top-k {args.top_k}: must be at most the vocabulary size "
                         f"{config.vocab_size}")
    mesh = mesh_from_args(args, config, len(args.prompt))
    start = time.perf_counter()
    model = load_for_generation(args.model, args.dtype, mesh, args.base_dtype)
    config = model[0]
    print(f"model {args.model}: {config.num_params() / 1e6:.1f}M parameters, {config.dtype}{base_note(args)}, "
          f"loaded in {time.perf_counter() - start:.1f}s{mesh_note(mesh)}", file=sys.stderr)
    res = generate_with_stats(
        model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system,
        mesh=mesh,
    )
    for i, (prompt, text) in enumerate(zip(args.prompt, res.texts)):
        print(f"### prompt {i + 1}: {prompt}")
        print(text)
        print()
    print(f"{res.new_tokens} new tokens in {res.run_s:.2f}s ({res.tokens_per_second:.1f} tokens/s; "
          f"{res.steps} steps of batch {len(args.prompt)}, {res.steps / res.run_s:.1f} steps/s; "
          f"compiled in {res.compile_s:.1f}s)")
    return 0


__all__ = ["add_parser", "cmd_generate"]
