"""A LoRAPrune run of an image classifier: the bundled ViT-S/14 with a linear head on MNIST
digits, or the bundled CIFAR-10 CNN distilled from itself (``loraprune-jax prune model=vit-s``).

Loads the family and its data, trains with progressive masks
(:func:`~loraprune_jax.train.classifier.train_classifier`), slices to a smaller dense model
(``slicing.slice_declared``), and measures the accuracy of the masked and the sliced model (and
the agreement with the dense model when distilling); writes ``run_config.json``,
``metrics.json`` and ``masks.npz`` under ``cfg.out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ClassifierConfig
from ..io.jsonfile import write_json
from ..core.groups import declared_masks
from ..core.masks import mask_stats
from ..core.slicing import slice_declared
from ..core.trees import count_params, excluded_layers
from ..train.classifier import (
    FAMILIES,
    Family,
    load_data,
    make_classifier_step,
    predict,
    train_classifier,
)
from ..train.loop import make_schedule
from ..train.step import make_optimizer
from . import METRICS_FILE, RUN_CONFIG_FILE


def run_classifier(cfg: ClassifierConfig, *, log: Callable[[str], None] = print,
                   family: Family | None = None, data: dict[str, np.ndarray] | None = None
                   ) -> dict[str, Any]:
    """Train LoRA (and the head), prune progressively, slice, evaluate; write config, metrics and
    masks under ``cfg.out`` (which must not exist). Returns the metrics. ``family`` and ``data``
    (``train_x``, ``train_y``, ``test_x``, ``test_y``) replace the model's own (tests)."""
    out = Path(cfg.out or f"runs/{cfg.model}-{cfg.prune.criterion}-{cfg.prune.ratio:g}-{int(time.time())}")
    if out.exists():
        raise FileExistsError(f"output directory {out} already exists; choose another out=")
    family = family or FAMILIES[cfg.model]()
    t, p = cfg.train, cfg.prune
    started = time.perf_counter()
    params = jax.tree.map(jnp.asarray, family.load())
    data = data or load_data(cfg.data or family.data, cfg.n_train, cfg.n_test, t.seed)
    distill = (cfg.data or family.data) != "mnist"
    declaration = family.declaration(params)
    log(f"loaded {cfg.model}: {count_params(params) / 1e6:.2f}M parameters, "
        f"{len(data['train_x'])} train / {len(data['test_x'])} test images, "
        f"{sum(len(k) for k in declaration)} group kinds over {len(declaration)} layers")

    key = jax.random.PRNGKey(t.seed)
    lora = family.init_lora(key, params, cfg.lora_rank)
    head = family.init_head(params, 10)
    trainable = {"lora": lora, **({"head": head} if head is not None else {})}
    masks = declared_masks(declaration)
    state = {"trainable": trainable, "opt_state": make_optimizer(t).init(trainable),
             "scores": jax.tree.map(jnp.zeros_like, masks), "step": jnp.zeros((), jnp.int32)}
    schedule = make_schedule(cfg)
    excluded = excluded_layers(len(declaration), p.exclude_first, p.exclude_last)
    step_fn = make_classifier_step(family, cfg, declaration, distill)

    dense_logits = predict(family, params, head, data["train_x"], cfg.eval_batch) if distill else None
    out.mkdir(parents=True)
    write_json(out / RUN_CONFIG_FILE, cfg.to_dict())
    state, masks, history, train_seconds = train_classifier(
        step_fn, state, params, masks, data, key, cfg=cfg, schedule=schedule, excluded=excluded,
        distill=distill, dense_logits=dense_logits, log=log)

    lora, head = state["trainable"]["lora"], state["trainable"].get("head")
    small = slice_declared(params, lora, masks, declaration, cfg.lora_scale)
    test_x, test_y = data["test_x"], data["test_y"]
    logits = {
        "dense": predict(family, params, None, test_x, cfg.eval_batch) if distill else None,
        "masked": predict(family, params, head, test_x, cfg.eval_batch, lora, masks, cfg.lora_scale),
        "sliced": predict(family, small, head, test_x, cfg.eval_batch),
    }
    stats = mask_stats(masks)
    metrics = {
        "model": cfg.model, "criterion": p.criterion, "ratio": p.ratio,
        "test_images": int(len(test_x)),
        "accuracy": float(np.mean(logits["sliced"].argmax(-1) == test_y)),
        "masked_accuracy": float(np.mean(logits["masked"].argmax(-1) == test_y)),
        "masked_vs_sliced_max_abs": float(np.max(np.abs(logits["masked"] - logits["sliced"]))),
        "params": count_params(params), "params_after": count_params(small),
        "groups_kept": {k: v for k, v in stats.items() if k.endswith("_kept")},
        "train_seconds": train_seconds, "run_seconds": time.perf_counter() - started,
        "history": history,
    }
    if distill:
        metrics["agreement_with_dense"] = float(np.mean(
            logits["sliced"].argmax(-1) == logits["dense"].argmax(-1)))
        metrics["dense_accuracy"] = float(np.mean(logits["dense"].argmax(-1) == test_y))
    write_json(out / METRICS_FILE, metrics)
    np.savez(out / "masks.npz", **{f"{i}/{k}": np.asarray(v) for i, layer in enumerate(masks["layers"])
                                   for k, v in layer.items()})
    log(f"accuracy {metrics['accuracy']:.3f} (masked {metrics['masked_accuracy']:.3f}); "
        f"parameters {metrics['params'] / 1e6:.2f}M -> {metrics['params_after'] / 1e6:.2f}M; "
        f"wrote {out}")
    return metrics


__all__ = ["run_classifier"]
