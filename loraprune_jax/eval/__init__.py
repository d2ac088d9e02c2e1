"""Evaluation of a (pruned) model: perplexity (LLM-Pruner protocol, :mod:`.perplexity`); zero-shot
accuracy through lm-evaluation-harness itself (our model as a harness model, :mod:`.harness`; the
harness's task definitions on local files, :mod:`.harness_tasks`; what ``zeroshot`` runs,
:mod:`.harness_eval`), over the batched log-likelihoods of :mod:`.loglikelihood`; text generation with the KV-cache decoder (:mod:`.generate`); loading, int8 and
placement of the evaluated model (:mod:`.loading`). Only perplexity is imported here; the others
load on first use."""

from .perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["PerplexityResult", "perplexity", "window_nll"]
