"""Template modeling code written next to exported per-layer-width checkpoints.

These modules are copied verbatim into an exported directory (see :mod:`loraprune_jax.io.export`)
so that ``transformers.AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` can
build a LLaMA whose layers have different head counts and MLP widths. They import torch and
transformers, so this package does not import them itself.
"""

from __future__ import annotations

from importlib import resources

FILES = ("configuration_pruned_llama.py", "modeling_pruned_llama.py")


def read_sources() -> dict[str, str]:
    """The template files, name -> source text."""
    root = resources.files(__name__)
    return {name: (root / name).read_text(encoding="utf-8") for name in FILES}
