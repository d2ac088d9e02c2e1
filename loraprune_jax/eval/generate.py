"""Text generation with the KV-cache decoder (``models.decode``); ``loraprune-jax generate`` is its
command-line front end (:mod:`loraprune_jax.cli.generate`).

Prompts are tokenized (through the tokenizer's chat template with ``chat=True``; the bundled
SmolLM2-135M-Instruct has one), run as one left-padded batch, and the continuations decoded up
to the first EOS.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Sequence

from jax.sharding import Mesh

from ..config import LlamaConfig, LoraConfig
from ..models import decode
from ..models.llama_params import stack_layers
from .loading import load_for_eval


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate_with_stats` produced, and how fast."""

    inputs: list[str]            # the model's input text per prompt (after the chat template)
    texts: list[str]             # continuations, up to (not including) EOS, special tokens dropped
    token_ids: list[list[int]]   # new token ids per prompt, EOS included when emitted
    compile_s: float
    run_s: float

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def steps(self) -> int:
        """Decode steps run (the longest continuation): the loop stops when every row has."""
        return max((len(t) for t in self.token_ids), default=0)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.run_s if self.run_s > 0 else float("inf")


def load_for_generation(spec: str | os.PathLike[str], dtype: str | None = None,
                        mesh: Mesh | None = None, base_dtype: str | None = None,
                        ) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """:func:`~loraprune_jax.eval.loading.load_for_eval` with layers stacked when widths are
    uniform (the decode loop then scans over layers: one compiled layer instead of ``L``
    unrolled ones); with a ``mesh``, placed on it (stacked the same way)."""
    return load_for_eval(spec, dtype, base_dtype=base_dtype, mesh=mesh, stack=True)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = False,
                   system: str | None = None) -> tuple[list[str], list[list[int]]]:
    """``(input texts, token ids)`` per prompt; with ``chat`` each prompt becomes one user turn
    of the tokenizer's chat template (plain text, with a warning, when it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if chat and not template:
        print("warning: the tokenizer has no chat template; using plain prompts", file=sys.stderr)
    texts, ids = [], []
    for p in prompts:
        if chat and template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p}
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
            row = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text, row = p, tokenizer(p)["input_ids"]
        if not row:
            raise ValueError(f"prompt {p!r} tokenizes to no tokens")
        texts.append(text)
        ids.append(list(row))
    return texts, ids


def generate_with_stats(
    model: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    chat: bool = False,
    system: str | None = None,
    dtype: str | None = None,
    lora: dict[str, Any] | None = None,
    masks: dict[str, Any] | None = None,
    lora_cfg: LoraConfig | None = None,
    timed: bool = True,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Generate continuations of ``prompts`` in one batch; see :func:`generate_text`.

    ``timed`` compiles ahead of time to report compile and run time apart (no jit-cache reuse);
    ``timed=False`` uses the cached jitted loop and reports the whole call as ``run_s``. With a
    ``mesh`` the model is placed on it and the batch split over it (``models.decode.generate``).
    """
    if isinstance(model, tuple):
        config, base, tokenizer = model
    else:
        config, base, tokenizer = load_for_generation(model, dtype, mesh)
        if isinstance(base["layers"], dict):
            lora = stack_layers(lora) if lora is not None else None
            masks = stack_layers(masks) if masks is not None else None
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; cannot generate text")
    if not prompts:
        raise ValueError("no prompts")
    inputs, ids = encode_prompts(tokenizer, prompts, chat, system)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    timings: dict[str, float] = {}
    start = time.perf_counter()
    out = decode.generate(
        base, config, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        key=seed, eos_id=eos, lora=lora, masks=masks, lora_cfg=lora_cfg,
        timings=timings if timed else None, mesh=mesh,
    )
    if not timed:
        timings = {"compile_s": 0.0, "run_s": time.perf_counter() - start}
    token_ids, texts = [], []
    for row in out.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        token_ids.append(row)
        body = row[:-1] if eos is not None and row and row[-1] == eos else row
        texts.append(tokenizer.decode(body, skip_special_tokens=True))
    return GenerationResult(inputs, texts, token_ids, timings["compile_s"], timings["run_s"])


def generate_text(model: Any, prompts: Sequence[str], **kwargs: Any) -> list[str]:
    """Continuations of ``prompts`` (greedy unless ``temperature > 0``).

    ``model``: ``"smollm2"``, a HF directory or a ``.gguf`` file (loaded, layers stacked when
    uniform), or a ``(config, base, tokenizer)`` tuple used as is. Keywords: ``max_new_tokens``
    (64), ``temperature``, ``top_k``, ``top_p``, ``seed``, ``chat`` (apply the chat template),
    ``system``, ``dtype``, ``lora``/``masks``/``lora_cfg`` (the unmerged masked model),
    ``mesh`` (a ``parallel.mesh.make_mesh`` mesh: the same greedy text as one device).
    """
    kwargs.setdefault("timed", False)
    return generate_with_stats(model, prompts, **kwargs).texts


__all__ = [
    "GenerationResult",
    "encode_prompts",
    "generate_text",
    "generate_with_stats",
    "load_for_generation",
]
