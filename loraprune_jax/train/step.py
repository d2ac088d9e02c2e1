"""The compiled train step: LoRA gradients (accumulated over micro-batches), clipping, AdamW, and
the group importance with its moving average, all inside one ``jax.jit``.

Only the small group-score vectors and a few scalars leave the step (with element-wise or N:M
masks, ``prune.granularity`` other than ``structured``, the scores are weight-shaped instead).
Masks are an array argument, so rewriting them between calls never recompiles.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ..config import PROJECTIONS, LlamaConfig, LoraConfig, PruneConfig, TrainConfig
from ..core.criteria import element_scores, gate_statistic, get_criterion
from ..core.gates import init_gates
from ..core.importance import ema_update
from ..models.llama import loss as model_loss
from ..models.llama_params import base_shardings, check_widths
from ..models.llama_pruning import layer_scores, stats_by_path
from ..models.quant import dequantize, dequantize_layer
from ..parallel.mesh import DEFAULT_RULES, Rules, activation_sharding, batch_sharding, replicated

Array = jax.Array
State = dict[str, Any]  # {"lora", "opt_state", "scores", "step"}


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up then linear decay to zero; clipping happens in the step."""
    decay_steps = max(train_cfg.steps - train_cfg.warmup_steps, 1)
    schedule = optax.linear_schedule(train_cfg.lr, 0.0, decay_steps)
    if train_cfg.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, train_cfg.lr, train_cfg.warmup_steps), schedule],
            [train_cfg.warmup_steps],
        )
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_cfg.weight_decay)


def clip_by_global_norm(grads: Any, clip_norm: float) -> tuple[Any, Array, Array]:
    """``grads`` scaled to global norm at most ``clip_norm``, with their norm before and the factor
    applied (our own: the metrics log the norm, and vanilla's weight gradients take the same factor)."""
    norm = optax.tree.norm(grads)
    factor = jnp.minimum(1.0, clip_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * factor, grads), norm, factor


def apply_update(state: State, trainable: str, grads: Any, new_scores: Any,
                 optimizer: optax.GradientTransformation, beta: float) -> tuple[State, Array]:
    """The end of every train step, language or vision: AdamW on ``state[trainable]`` with the
    (clipped) ``grads``, skipped when they are not finite (a non-finite loss would otherwise turn
    every adapter weight into NaN for good); the new scores folded into the moving average
    (skipped when not finite); the step counted. Returns the new state and the scores' "skipped"
    flag."""
    scores, skipped = ema_update(state["scores"], new_scores, beta)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state[trainable])
    params = optax.apply_updates(state[trainable], updates)
    finite = jnp.isfinite(optax.tree.norm(grads))
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state[trainable])
    opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
    return {**state, trainable: params, "opt_state": opt_state, "scores": scores,
            "step": state["step"] + 1}, skipped


def zero_scores(masks: dict[str, Any]) -> dict[str, Any]:
    """EMA scores start at zero, shaped like the masks (group vectors or weight-shaped)."""
    return jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), masks)


def init_state(lora: dict[str, Any], masks: dict[str, Any], train_cfg: TrainConfig) -> State:
    """A fresh train state for ``lora`` (optimizer state, zero scores, step 0)."""
    return {
        "lora": lora,
        "opt_state": make_optimizer(train_cfg).init(lora),
        "scores": zero_scores(masks),
        "step": jnp.zeros((), jnp.int32),
    }


def _map_layers(fn: Callable[..., Any], *trees: Any) -> Any:
    """Apply ``fn`` layer by layer: ``lax.map`` over stacked layers, a loop over a layer list.

    Either way one layer's element scores exist at a time inside the compiled step.
    """
    first = trees[0]
    if isinstance(first, dict):
        return jax.lax.map(lambda xs: fn(*xs), trees)
    return [fn(*(t[i] if t is not None else None for t in trees)) for i in range(len(first))]


def _projection_weights(base: dict[str, Any]) -> dict[str, Any]:
    """The projections vanilla differentiates: an int8 base's dequantized (its float ``W``)."""
    layers, dtype = base["layers"], base["embed"].dtype
    if isinstance(layers, dict):
        return {name: dequantize(layers[name], dtype) for name in PROJECTIONS}
    return [{name: dequantize(layer[name], dtype) for name in PROJECTIONS} for layer in layers]


def _with_projection_weights(base: dict[str, Any], weights: Any) -> dict[str, Any]:
    layers = base["layers"]
    if isinstance(layers, dict):
        return {**base, "layers": {**layers, **weights}}
    return {**base, "layers": [{**l, **w} for l, w in zip(layers, weights)]}


def make_train_step(
    config: LlamaConfig,
    lora_cfg: LoraConfig,
    train_cfg: TrainConfig,
    prune_cfg: PruneConfig,
    *,
    donate: bool = True,
    jit: bool = True,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    stacked: bool | None = None,
    base_dtype: str | None = None,
) -> Callable[..., tuple[State, dict[str, Array]]]:
    """Build ``step(state, base, masks, batch, key) -> (state, metrics)``.

    ``batch["tokens"]`` is ``(grad_accum, micro_batch, seq_len)`` (``loss_mask`` optional, same
    shape). The LoRA gradients are averaged over micro-batches, clipped to global norm
    ``clip_norm``, fed to AdamW, and, with the same clipped gradients, turned into group scores
    under ``prune_cfg.criterion`` and folded into the EMA (skipped when not finite).
    ``vanilla`` also differentiates the frozen projection weights (that is its cost);
    ``wanda`` collects input norms in the forward pass. ``fisher`` and ``taylor`` also
    differentiate per-example gates equal to the masks (``core.gates``): the new score of a
    group is the sum over examples of its squared gate gradient (``fisher``) or the signed
    gradient of the step's loss (``taylor``, ranked by magnitude), taken before clipping, which
    exists for the optimizer. With ``jit=False`` the function is
    returned untraced (for inspection); otherwise it is jitted with the state donated.

    With a ``mesh`` the step is compiled for it: the base is expected sharded by ``rules``
    (:func:`~loraprune_jax.models.llama_params.shard_base`; ``stacked`` layers, by default when the
    widths are uniform), the batch split over ``data`` x ``fsdp``, and the state, masks, key,
    scores and metrics replicated. Group scores are reduced from the sharded weights and
    gradients inside the step, so only the small vectors are replicated. ``base_dtype="int8"``
    says the base's projections are int8 (``models.quant``; needed for the mesh's shardings):
    each is dequantized where it is used, the criteria read the dequantized ``W`` one layer at
    a time, and ``vanilla`` differentiates the dequantized weights.

    With ``prune_cfg.granularity`` ``unstructured`` or ``nm`` the masks are weight-shaped
    (``models.llama_pruning.init_element_masks``) and the step keeps the moving average of the
    criterion's element scores (:func:`~loraprune_jax.core.criteria.element_scores`) of the
    masked projections instead of group scores.
    """
    criterion = prune_cfg.criterion
    spec = get_criterion(criterion)
    element = prune_cfg.element_wise
    gated = spec.gated
    vanilla = "weight_grads" in spec.needs  # it differentiates the frozen projection weights
    if gated and element:
        raise ValueError(f"criterion {criterion!r} scores groups; it needs structured masks")
    optimizer = make_optimizer(train_cfg)
    scale = lora_cfg.scale
    want_stats = "input_stats" in spec.needs

    def loss_fn(lora: Any, extra: Any, base: Any, masks: Any, micro: Any, key: Array):
        # extra: the projection weights (vanilla) or the group gates (fisher, taylor)
        weights = extra if vanilla else None
        gates = extra if gated else None
        if weights is not None:
            base = _with_projection_weights(base, weights)
        out = model_loss(
            base, lora, masks, micro, config, lora_cfg,
            rng=key if lora_cfg.dropout > 0 else None,
            remat=train_cfg.remat, return_stats=want_stats, gates=gates,
        )
        return out if want_stats else (out, None)

    argnums = (0, 1) if vanilla or gated else 0
    grad_fn = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)

    def step(state: State, base: Any, masks: Any, batch: dict[str, Array], key: Array):
        lora = state["lora"]
        accum = batch["tokens"].shape[0]
        step_key = jax.random.fold_in(key, state["step"])
        drop_key, score_key = jax.random.split(step_key)
        extra = None
        if vanilla:
            extra = _projection_weights(base)
        elif gated:  # equal to the masks, one per example: forward and LoRA grads unchanged
            extra = init_gates(masks, batch["tokens"].shape[1])

        def micro_step(carry, xs):
            micro, k = xs
            (value, stats), grads = grad_fn(lora, extra, base, masks, micro, k)
            if gated:  # per-example gate gradients -> this micro-batch's fisher/taylor sums
                grads = (grads[0], gate_statistic(criterion, grads[1]))
            total = jax.tree.map(jnp.add, carry, (value, grads, stats))
            return total, None

        micro0 = jax.tree.map(lambda x: x[0], batch)
        zeros = jax.eval_shape(grad_fn, lora, extra, base, masks, micro0, drop_key)
        grad_zeros = zeros[1]
        if gated:
            grad_zeros = (grad_zeros[0], jax.eval_shape(
                functools.partial(gate_statistic, criterion), grad_zeros[1]))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], grad_zeros, zeros[0][1]))
        (loss_sum, grad_sum, stats_sum), _ = jax.lax.scan(
            micro_step, init, (batch, jax.random.split(drop_key, accum))
        )
        if gated:
            # the step's loss is the mean over micro-batches: a gate gradient of the step is the
            # micro-batch's over accum (squared for fisher); the LoRA gradients are averaged
            gate_sum = grad_sum[1]
            lora_grads = jax.tree.map(lambda g: g / accum, grad_sum[0])
            weight_grads = None
        else:
            mean = jax.tree.map(lambda g: g / accum, grad_sum)
            lora_grads, weight_grads = mean if vanilla else (mean, None)
        lora_grads, grad_norm, clip = clip_by_global_norm(lora_grads, train_cfg.clip_norm)
        if weight_grads is not None:  # kept in the weights' dtype: no f32 copy of a bf16 model
            weight_grads = jax.tree.map(lambda g: g * clip.astype(g.dtype), weight_grads)

        layers = base["layers"]
        n_layers = len(layers) if isinstance(layers, list) else layers["q"].shape[0]
        layer_keys = jax.random.split(score_key, n_layers)

        names = None  # the masked projections, read off the (weight-shaped) scores' keys
        if element:
            score_layers = state["scores"]["layers"]
            names = tuple(score_layers if isinstance(score_layers, dict) else score_layers[0])

        def one_layer(layer, adapters, grads, wgrads, stats, k):
            layer = dequantize_layer(layer, base["embed"].dtype)  # criteria read the float W
            if element:
                scored = element_scores(
                    criterion, layer, adapters, [(name,) for name in names], scale=scale,
                    power=prune_cfg.power, lora_grads=grads, weight_grads=wgrads,
                    input_stats=stats_by_path(stats), key=k,
                )
                return {path[0]: s for path, s in scored.items()}
            return layer_scores(
                criterion, layer, adapters, config.head_dim, scale=scale, power=prune_cfg.power,
                lora_grads=grads, weight_grads=wgrads, input_stats=stats, key=k,
            )

        keys = layer_keys if isinstance(layers, dict) else list(layer_keys)
        if gated:  # already one score per group, from the gates; no per-module normalisation
            new_scores = jax.tree.map(lambda g: g / accum**spec.gate_power, gate_sum)
        else:
            new_scores = {"layers": _map_layers(
                one_layer, layers, lora["layers"], lora_grads["layers"],
                weight_grads, stats_sum["layers"] if stats_sum is not None else None, keys,
            )}
        new_state, skipped = apply_update(state, "lora", lora_grads, new_scores, optimizer,
                                          prune_cfg.beta)
        metrics = {"loss": loss_sum / accum, "grad_norm": grad_norm, "score_skipped": skipped}
        return new_state, metrics

    if mesh is not None:
        check_widths(config, mesh, rules)
        traced = step

        def step(state, base, masks, batch, key):  # noqa: F811 - the same step, under the mesh
            with activation_sharding(mesh, rules):
                return traced(state, base, masks, batch, key)

    if not jit:
        return step
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    rep = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, base_shardings(config, mesh, rules, stacked, base_dtype), rep,
                      batch_sharding(mesh, 3, 1, rules), rep),
        out_shardings=(rep, rep),
        donate_argnums=donate_argnums,
    )
