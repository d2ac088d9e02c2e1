"""The package's shape: what importing it loads, and the core's dependencies."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loraprune_jax"
HEAVY = ("transformers", "tokenizers", "gguf", "tensorflow_datasets", "gensim", "onnx", "h5py",
         "torch", "matplotlib", "orbax")


@pytest.mark.parametrize("statement", [
    "import loraprune_jax",
    "import loraprune_jax.core",
    "from loraprune_jax.core import declared_scores, slice_declared, update_masks",
    "from loraprune_jax import forward, init_masks, slice_and_merge, PruneConfig",
])
def test_import_loads_no_heavy_dependency(statement):
    code = (f"import sys, json\n{statement}\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_lazy_names_still_resolve():
    code = ("import loraprune_jax as lp\nprint(lp.load_model.__module__, lp.perplexity.__module__,"
            " lp.CheckpointError.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["loraprune_jax.io", "loraprune_jax.eval.perplexity", "CheckpointError"]
    import loraprune_jax
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        loraprune_jax.nope  # noqa: B018


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level >= 2:
            out.add(f"loraprune_jax.{node.module or ''}")
    return out


def test_core_imports_only_jax_numpy_optax_flax():
    allowed = {"jax", "numpy", "optax", "flax"} | set(sys.stdlib_module_names)
    for path in sorted((PACKAGE / "core").glob("*.py")):
        bad = _imports(path) - allowed
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_module_over_the_size_limit():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 450} == {}


BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # as if the package were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {name!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("blocked, statement, message", [
    ("gguf", "from loraprune_jax.io import load_smollm2",
     "reading a .gguf file needs the 'gguf' package: pip install 'loraprune-jax[gguf]'"),
    ("transformers", "from loraprune_jax.io.tokenizer import tokenizer_from_gguf as t; t('x')",
     "a tokenizer needs the 'transformers' package: pip install 'loraprune-jax[hf]'"),
])
def test_missing_extra_names_the_extra(blocked, statement, message):
    code = BLOCK.format(name=blocked) + "import loraprune_jax, loraprune_jax.io\n" + statement
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"loraprune_jax.extras.MissingExtra: {message}" in out.stderr
