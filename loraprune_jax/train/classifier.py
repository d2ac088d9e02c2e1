"""LoRAPrune for image classifiers: the bundled ViT-S/14 with a linear head on MNIST digits
(a VTAB-1k-style task) and the bundled CIFAR-10 CNN.

The LLaMA loop's machinery, unchanged, driven by each family's group declaration
(``pruning.groups``): in-step importance (``criteria.declared_scores``) with its moving average,
the cubic schedule, the mask update between compiled phases, and slicing to a smaller dense
model (``slicing.slice_declared``). What differs is only the model, the data and the loss:
cross-entropy on labels for the ViT (LoRA on the backbone and the head trained together), and
distillation from the dense model's own predictions for the CNN, whose offline data is only 20
labelled CIFAR-10 images (so its figure of merit is the agreement with the dense model).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import VISION_MODELS, ClassifierConfig
from ..data import images as _images
from ..pruning.criteria import declared_scores
from ..pruning.gates import gate_statistic, init_gates, is_gate_criterion, ranking_scores
from ..pruning.groups import declared_masks
from ..pruning.importance import ema_update
from ..pruning.masks import excluded_layers, mask_stats, update_masks
from ..pruning.slicing import count_params, slice_declared
from ..io.jsonfile import write_json
from .loop import METRICS_FILE, RUN_CONFIG_FILE, make_schedule
from .step import clip_by_global_norm, make_optimizer

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
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        if gated:
            new_scores = gate_statistic(p.criterion, gate_grads)
        else:
            new_scores = declared_scores(p.criterion, params, state["trainable"]["lora"], declaration,
                                         scale=scale, power=p.power, lora_grads=grads["lora"],
                                         key=jax.random.fold_in(key, state["step"]))
        scores, skipped = ema_update(state["scores"], new_scores, p.beta)
        labels = jnp.argmax(targets, -1) if distill else targets
        new_state = {"trainable": optax.apply_updates(state["trainable"], updates),
                     "opt_state": opt_state, "scores": scores, "step": state["step"] + 1}
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
    rng = np.random.default_rng(t.seed)
    order: list[int] = []
    history = []
    out.mkdir(parents=True)
    write_json(out / RUN_CONFIG_FILE, cfg.to_dict())
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
    train_seconds = time.perf_counter() - train_start

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


__all__ = ["ClassifierConfig", "FAMILIES", "Family", "VISION_MODELS", "cnn_family", "load_data",
           "make_classifier_step", "predict", "run_classifier", "vit_family"]
