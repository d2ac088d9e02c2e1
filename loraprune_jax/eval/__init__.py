"""Evaluation of a (pruned) model: perplexity (LLM-Pruner protocol, :mod:`.perplexity`), zero-shot
multiple-choice accuracy with lm-evaluation-harness semantics (:mod:`.zeroshot`, with its tasks in
:mod:`.zeroshot_tasks` and the batched log-likelihoods in :mod:`.loglikelihood`), and text
generation with the KV-cache decoder (:mod:`.generate`). Only perplexity is imported here; the
others load on first use."""

from .perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["PerplexityResult", "perplexity", "window_nll"]
