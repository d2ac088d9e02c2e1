"""Our JAX model as an lm-evaluation-harness (0.4.13) model, registered as ``loraprune-jax``.

After ``import loraprune_jax.eval.harness`` the harness's Python API runs any of its tasks on our
model::

    import lm_eval, loraprune_jax.eval.harness
    lm_eval.simple_evaluate(model="loraprune-jax",
                            model_args="pretrained=smollm2,base_dtype=int8,mesh=fsdp:-1",
                            tasks=["piqa"])

``pretrained`` is any model spec of ``io.load_model`` (``smollm2``, a HF directory such as our
pruned export with per-layer widths, a ``.gguf`` file). The three request types are served by our
jitted, bucketed scoring (``eval.loglikelihood.score_tokens``) and the KV-cache generator
(``models.decode.generate``), tokenized as the harness's ``hf`` model tokenizes. Needs the
``harness`` extra (``pip install 'loraprune-jax[harness]'``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from ..extras import require
from .loading import load_for_eval
from .loglikelihood import encode_requests, prefix_token_id, score_tokens, tok_encode

require("lm_eval", "the lm-evaluation-harness model (loraprune_jax.eval.harness)")
from lm_eval.api.model import LM  # noqa: E402 - after the extra's check
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import (  # noqa: E402
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

NAME = "loraprune-jax"


@register_model(NAME)
class LoraPruneJaxLM(LM):
    """``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` of our JAX model.

    ``model_args``: ``pretrained`` (model spec), ``dtype`` (compute dtype), ``base_dtype``
    (``int8``: the frozen projections in 8 bits), ``mesh`` (a mesh spec as ``prune``'s
    ``mesh=``; default one device), ``batch_size`` (rows per compiled call), ``max_length``
    (default the model's context length), ``max_gen_toks`` (default 256, as the ``hf`` model).
    ``device`` and ``max_batch_size``, which the harness passes every model, are not used (JAX
    places the model; ``mesh`` spreads it); any other argument is refused by name.
    """

    def __init__(self, pretrained: str = "smollm2", dtype: str | None = None,
                 base_dtype: str | None = None, mesh: str | None = None,
                 batch_size: int | str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, device: Any = None, max_batch_size: Any = None) -> None:
        super().__init__()
        from ..parallel.mesh import make_mesh

        placed = make_mesh(mesh) if mesh else None
        model = load_for_eval(pretrained, dtype, base_dtype=base_dtype, mesh=placed, stack=True)
        auto = batch_size in (None, "auto") or str(batch_size).startswith("auto")
        self._setup(*model, mesh=placed, batch_size=None if auto else int(batch_size),
                    max_length=max_length, max_gen_toks=max_gen_toks, name=str(pretrained))

    @classmethod
    def from_model(cls, config: Any, base: dict[str, Any], tokenizer: Any, *,
                   batch_size: int | None = None, mesh: Any = None, max_length: int | None = None,
                   max_gen_toks: int = 256, name: str = "model") -> LoraPruneJaxLM:
        """The harness model of an already loaded ``(config, base, tokenizer)``; with a ``mesh``
        the base is placed on it as ``load_for_eval`` places it (as it is when already there)."""
        if mesh is not None:
            from ..models.llama_params import place_base

            base = place_base(base, config, mesh)
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._setup(config, base, tokenizer, mesh=mesh, batch_size=batch_size,
                  max_length=max_length, max_gen_toks=max_gen_toks, name=name)
        return lm

    def _setup(self, config: Any, base: dict[str, Any], tokenizer: Any, *, mesh: Any,
               batch_size: int | None, max_length: int | None, max_gen_toks: int,
               name: str) -> None:
        if tokenizer is None:
            raise ValueError(f"model {name} has no tokenizer files; the harness needs one")
        self.config, self.base, self.tokenizer, self.mesh = config, base, tokenizer, mesh
        self.batch_size = None if batch_size is None else int(batch_size)
        self._max_length = int(max_length) if max_length else config.max_position_embeddings
        self.max_gen_toks, self.pretrained = int(max_gen_toks), name
        self.show_progress = True  # our progress bars (the harness's own are its business)
        self.tokens_scored: dict[tuple[str, str], int] = {}  # (context, continuation) -> tokens

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", self.pretrained).replace("/", "__")

    def _score(self, encoded: list[tuple[list[int], list[int]]], progress: bool,
               desc: str) -> tuple[np.ndarray, np.ndarray]:
        return score_tokens(self.base, self.config, encoded, batch_size=self.batch_size,
                            max_length=self.max_length, progress=progress and self.show_progress,
                            desc=desc, mesh=self.mesh)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        args = [tuple(r.args) for r in requests]
        encoded = encode_requests(self.tokenizer, args)
        self.tokens_scored.update((pair, len(c) + len(x)) for pair, (c, x) in zip(args, encoded))
        ll, greedy = self._score(encoded, not disable_tqdm, "loglikelihood")
        out = [(float(a), bool(b)) for a, b in zip(ll, greedy)]
        for pair, result in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood over windows of ``max_length`` tokens, every token scored
        once with as much context as fits (the harness's rolling windows)."""
        prefix = prefix_token_id(self.tokenizer)
        if prefix is None:
            raise ValueError(f"{self.pretrained}: the tokenizer has no BOS or EOS token to start "
                             "each text's first window with (loglikelihood_rolling needs one)")
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            ids = tok_encode(self.tokenizer, text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=prefix, max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        ll, _ = self._score(windows, not disable_tqdm, "loglikelihood_rolling")
        totals = np.zeros(len(requests), np.float64)
        np.add.at(totals, np.asarray(owner, np.int64), ll)
        out = [float(t) for t in totals]
        for request, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(request.args), result)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, cut at the first stop string;
        requests with the same generation settings run as one batch."""
        from ..models.decode import generate

        eos_id = self.tokenizer.eos_token_id
        eos = self.tokenizer.decode([eos_id]) if eos_id is not None else None
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} must be below the context length "
                                 f"{self.max_length}")
            keep = self.max_length - max_gen
            prompts = [tok_encode(self.tokenizer, requests[i].args[0])[-keep:] for i in indices]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            new = generate(self.base, self.config, prompts, max_gen, temperature=temperature,
                           top_p=kwargs.get("top_p"), top_k=kwargs.get("top_k"), eos_id=eos_id,
                           mesh=self.mesh)
            for row, i in zip(new, indices):
                tokens = [int(t) for t in row]
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id)]
                text = postprocess_generated_text(self.tokenizer.decode(tokens), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", tuple(requests[i].args), text)
        return out


def main() -> None:
    """``python -m loraprune_jax.eval.harness run --model loraprune-jax --model_args
    pretrained=smollm2 --tasks piqa ...``: the harness's own command line (whose model list
    cannot import an outside package) with our model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


__all__ = ["LoraPruneJaxLM", "NAME", "main"]

if __name__ == "__main__":
    main()
