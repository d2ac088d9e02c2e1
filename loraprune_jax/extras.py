"""Optional dependencies: import one where a user needs it, or say which extra installs it.

The core, the models, training and evaluation need only the packages ``pip install loraprune-jax``
installs; readers of other formats and data sources need an extra (``pyproject.toml``), and
``./dev`` installs them all.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> the extra of pyproject.toml that installs it
EXTRAS = {
    "transformers": "hf",
    "tokenizers": "hf",
    "gguf": "gguf",
    "gensim": "data",
    "tensorflow_datasets": "data",
    "onnx": "vision",
    "h5py": "vision",
    "PIL": "vision",
    "matplotlib": "plot",
    "lm_eval": "harness",
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, what: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` saying that ``what`` needs it and how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but broken: let its own error through
        extra = EXTRAS.get(top, "all")
        raise MissingExtra(f"{what} needs the {top!r} package: pip install 'loraprune-jax[{extra}]' "
                           "(or ./dev setup, which installs every extra)") from e
