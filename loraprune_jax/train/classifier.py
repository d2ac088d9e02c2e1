"""The training side of LoRAPrune for image classifiers: the bundled ViT-S/14 with a linear head
on MNIST digits (a VTAB-1k-style task) and the bundled CIFAR-10 CNN.

The LLaMA loop's machinery, unchanged, driven by each family's group declaration
(``core.groups``): in-step importance (``core.criteria.declared_scores``) with its moving average,
the cubic schedule and the mask update between compiled phases. What differs is only the model,
the data and the loss: cross-entropy on labels for the ViT (LoRA on the backbone and the head
trained together), and distillation from the dense model's own predictions for the CNN, whose
offline data is only 20 labelled CIFAR-10 images (so its figure of merit is the agreement with
the dense model). The whole run (slicing, accuracy, files) is :mod:`loraprune_jax.run.classifier`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import ClassifierConfig
from ..data import images as _images
from ..core.criteria import declared_scores, gate_statistic, is_gate_criterion, ranking_scores
from ..core.gates import init_gates
from ..core.masks import update_masks
from ..core.schedule import OneShotSchedule, PruneSchedule
from .step import apply_update, clip_by_global_norm, make_optimizer

Array = jax.Array


@dataclass(frozen=True)
class Family:
    """What the loop needs from a model family: load it, its logits, its groups, its LoRA."""

    load: Callable[[], Any]
    logits: Callable[..., Array]  # (params, head, images, lora, masks, scale) -> (B, classes)
    declaration: Callable[[Any], list]
    init_lora: Callable[[Array, Any, int], Any]
    init_head: Callable[[Any, int], Any]  # None for a model with its own classifier
    data: str


def vit_family(load: Callable[[], Any] | None = None, image_size: int = 224) -> Family:
    """The bundled ViT-S/14 (or ``load()``'s ViT) with a linear head on upsampled digits."""
    from ..io.onnx_vit import load_vit_s
    from ..models import vit

    def logits(params, head, images, lora, masks, scale):
        x = _images.to_model_input(images, image_size)  # 28x28 uint8 -> 224x224x3, in the jit
        return vit.features(params, x, lora, masks, scale) @ head["w"] + head["b"]

    return Family(
        load=load or load_vit_s,
        logits=logits,
        declaration=vit.declaration,
        init_lora=lambda key, params, rank: vit.init_vit_lora(key, params, rank),
        init_head=lambda params, classes: {"w": jnp.zeros((params["cls"].shape[-1], classes)),
                                           "b": jnp.zeros((classes,))},
        data="mnist",
    )


def cnn_family(load: Callable[[], Any] | None = None) -> Family:
    """The bundled CIFAR-10 CNN (or ``load()``'s params of the same layer structure)."""
    from ..io.keras_h5 import load_cifar10_cnn
    from ..models import cnn

    def logits(params, head, images, lora, masks, scale):
        del head
        return cnn.forward(params, images.astype(jnp.float32), lora, masks, scale)

    return Family(
        load=load or (lambda: load_cifar10_cnn()[0]),
        logits=logits,
        declaration=cnn.cnn_declaration,
        init_lora=lambda key, params, rank: cnn.init_cnn_lora(key, params, rank, 0.0),
        init_head=lambda params, classes: None,
        data="foolbox:cifar10",
    )


FAMILIES: dict[str, Callable[[], Family]] = {"vit-s": vit_family, "cifar10-cnn": cnn_family}


def load_data(spec: str, n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Train and test images (uint8) and labels; ``foolbox:cifar10`` uses its 20 for both."""
    if spec == "mnist":
        x, y = _images.load_mnist()
        (xtr, ytr), (xte, yte) = _images.mnist_split(x, y, n_train, n_test, seed)
    else:
        xtr, ytr = _images.load_foolbox_images(spec.split(":", 1)[1])
        xte, yte = xtr, ytr
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}


def make_classifier_step(family: Family, cfg: ClassifierConfig, declaration: list,
                         distill: bool) -> Callable:
    """The compiled step: loss, LoRA (+head) gradients, clipping, AdamW, and the group scores'
    moving average, as ``train.step`` does for LLaMA. ``targets`` are labels ``(B,)``, or the
    dense model's logits ``(B, classes)`` when ``distill``."""
    optimizer = make_optimizer(cfg.train)
    scale, p = cfg.lora_scale, cfg.prune
    gated = is_gate_criterion(p.criterion)

    def loss_fn(trainable, gates, params, masks, images, targets):
        # the masks gate each group's output in these models: per-example copies of them are the
        # gates of the fisher/taylor criteria (same forward, same LoRA gradients)
        gates_or_masks = gates if gates is not None else masks
        logits = family.logits(params, trainable.get("head"), images, trainable["lora"],
                               gates_or_masks, scale)
        if distill:
            ce = -jnp.sum(jax.nn.softmax(targets) * jax.nn.log_softmax(logits), axis=-1)
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.mean(ce), logits

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, params, masks, images, targets, key):
        gates = init_gates(masks, images.shape[0]) if gated else None
        (loss, logits), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state["trainable"], gates, params, masks, images, targets)
        grads, gate_grads = grads
        grads, grad_norm, _ = clip_by_global_norm(grads, cfg.train.clip_norm)
        if gated:
            new_scores = gate_statistic(p.criterion, gate_grads)
        else:
            new_scores = declared_scores(p.criterion, params, state["trainable"]["lora"], declaration,
                                         scale=scale, power=p.power, lora_grads=grads["lora"],
                                         key=jax.random.fold_in(key, state["step"]))
        new_state, skipped = apply_update(state, "trainable", grads, new_scores, optimizer, p.beta)
        labels = jnp.argmax(targets, -1) if distill else targets
        return new_state, {"loss": loss, "grad_norm": grad_norm, "score_skipped": skipped,
                           "acc": jnp.mean(jnp.argmax(logits, -1) == labels)}

    return step


def predict(family: Family, params: Any, head: Any, images: np.ndarray, batch: int,
            lora: Any = None, masks: Any = None, scale: float = 0.0) -> np.ndarray:
    """Logits of every image, in jitted batches (the last one padded, so one compile)."""
    fn = jax.jit(lambda p, h, x, lo, m: family.logits(p, h, x, lo, m, scale))  # weights as arguments
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        pad = batch - len(x)
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        out.append(np.asarray(fn(params, head, x, lora, masks))[:batch - pad])
    return np.concatenate(out)


def train_classifier(
    step_fn: Callable,
    state: dict[str, Any],
    params: Any,
    masks: Any,
    data: dict[str, np.ndarray],
    key: Array,
    *,
    cfg: ClassifierConfig,
    schedule: PruneSchedule | OneShotSchedule,
    excluded: tuple[int, ...],
    distill: bool,
    dense_logits: np.ndarray | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Any, list[dict[str, Any]], float]:
    """``cfg.train.steps`` steps of ``step_fn`` on shuffled micro-batches of ``data["train_x"]``
    (when ``distill``: randomly flipped, with ``dense_logits`` as targets), the masks updated on
    the schedule. Returns ``(state, masks, history, seconds)``."""
    t, p = cfg.train, cfg.prune
    rng = np.random.default_rng(t.seed)
    order: list[int] = []
    history = []
    train_start = time.perf_counter()
    for step in range(1, t.steps + 1):
        if len(order) < t.micro_batch_size:
            order += list(rng.permutation(len(data["train_x"])))
        idx, order = order[:t.micro_batch_size], order[t.micro_batch_size:]
        images = data["train_x"][idx]
        if distill:  # random horizontal flips: 20 images, many views
            flip = rng.random(len(idx)) < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        targets = dense_logits[idx] if distill else data["train_y"][idx]
        state, metrics = step_fn(state, params, masks, images, targets, key)
        if schedule.is_update_step(step):
            masks = update_masks(masks, ranking_scores(p.criterion, state["scores"]),
                                 schedule.ratio_at(step), excluded=excluded, allocation=p.allocation)
        record = {"step": step, "loss": float(metrics["loss"]), "acc": float(metrics["acc"]),
                  "target_ratio": schedule.ratio_at(step)}
        history.append(record)
        if bool(metrics["score_skipped"]):
            log(f"step {step}: non-finite importance scores; moving average not updated")
        if step % 10 == 0 or step == t.steps:
            log(f"step {step}/{t.steps} loss {record['loss']:.4f} acc {record['acc']:.3f} "
                f"ratio {record['target_ratio']:.3f}")
    return state, masks, history, time.perf_counter() - train_start


__all__ = ["FAMILIES", "Family", "cnn_family", "load_data", "make_classifier_step", "predict",
           "train_classifier", "vit_family"]
