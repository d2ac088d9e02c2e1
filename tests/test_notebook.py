"""The Colab notebook executes from top to bottom (with a tiny setting), so it cannot rot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import ZEROSHOT_DATA

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "colab_demo.ipynb"


@pytest.mark.slow
def test_colab_notebook_executes(smollm2_cache, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for key, value in {"DEMO_STEPS": "4", "DEMO_EVAL_WINDOWS": "2", "DEMO_NEW_TOKENS": "8",
                       "DEMO_OUT": str(tmp_path / "run"), "DEMO_ZEROSHOT_LIMIT": "2",
                       "LORAPRUNE_JAX_EVAL_DATA": str(ZEROSHOT_DATA), "HF_DATASETS_OFFLINE": "1",
                       "LORAPRUNE_JAX_CACHE": str(smollm2_cache)}.items():  # the session's SmolLM2
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                        for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "parameters: 134.5M -> 92.3M" in outputs
    assert "perplexity on wiki:heldout" in outputs
    assert outputs.count("dense :") == 2 and outputs.count("pruned:") == 2
    # the harness on the fixture files: 2 documents per task, so accuracies are 0, 0.5 or 1
    for name in ("dense", "pruned"):
        line = next(x for x in outputs.splitlines() if x.startswith(f"zero-shot acc ({name})"))
        accs = [float(w) for w in line.split(":")[1].split()[1::2]]
        assert len(accs) == 2 and set(accs) <= {0.0, 0.5, 1.0}, line
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the per-layer picture was not drawn"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["layers"]["heads"][3] == 6
    assert os.path.isdir(tmp_path / "run" / "model")
