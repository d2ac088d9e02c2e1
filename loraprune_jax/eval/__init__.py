"""Evaluation: perplexity (LLM-Pruner protocol)."""

from .perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["PerplexityResult", "perplexity", "window_nll"]
