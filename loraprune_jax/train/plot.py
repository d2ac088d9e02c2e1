"""The picture of a run: training loss and pruned fractions against steps (``training.png``).

matplotlib is imported inside :func:`plot_history`, only when a run draws its picture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..extras import require


def plot_history(history: list[dict[str, Any]], path: Path, title: str,
                 element: bool = False) -> None:
    """Loss and pruned fraction against steps, as a PNG (``element``: of weights, not groups).

    Drawn on a bare ``Figure`` (no pyplot), so the caller's matplotlib backend, a notebook's
    inline one for instance, is left alone."""
    Figure = require("matplotlib.figure", "plotting training.png").Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["target_ratio"] for h in history], color="tab:red", lw=1, label="target ratio")
    attn, mlp = ("attention weights", "MLP weights") if element else ("attention units",
                                                                       "MLP channels")
    ax2.plot(steps, [1 - h["attn_kept"] for h in history], color="tab:orange", lw=1, ls="--",
             label=f"{attn} pruned (all layers)")
    ax2.plot(steps, [1 - h["mlp_kept"] for h in history], color="tab:green", lw=1, ls=":",
             label=f"{mlp} pruned (all layers)")
    ax2.set_ylabel("pruned fraction")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="center right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
