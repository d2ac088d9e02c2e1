"""Where the time of our `lora` train step goes, by phase, against the FLOPs of each phase.

    python experiments/bench/profile_step.py --shapes 1x128 2x256 4x512 --steps 3

Each phase is compiled and timed on its own (medians, same model, tokens and keys). FLOPs: XLA's
own count of each executable (``compiled.cost_analysis()``) where it has no loop; XLA counts a
loop body once, so the phases that loop over the layers (step, forward, backward: ``lax.scan``;
importance: ``lax.map``) take the analytic count of flops.py (forward = the model's forward pass
plus the adapters', backward = the activation gradients plus twice the adapters', the step =
both plus the importance) and XLA's per-layer count times the layers:

* ``step``: the whole compiled train step (`lora` criterion, dropout 0.05, AdamW, clipping);
* ``forward``: the loss alone; ``backward``: value-and-grad of the loss in the LoRA tree, minus
  ``forward``; ``dropout``: value-and-grad with dropout 0.05 minus the same without dropout;
* ``attention``: fwd + bwd of the causal attention of every layer (in ``forward``/``backward``);
* ``lm head + loss``: fwd + bwd of the tied 49k-word head and the log-softmax from the final
  hidden states (in ``forward``/``backward``);
* ``importance``: the `lora` element scores reduced to groups, every layer (part of the step);
* ``optimizer``: clipping and the AdamW update of the LoRA tree (part of the step).

Phases that are parts of others overlap by design; the rows say which. The share of the matmul
peak uses one large ``jnp.dot`` (flops.matmul_peak) measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peer import parse_shape  # noqa: E402
from flops import forward_flops, lora_flops, matmul_peak  # noqa: E402

from loraprune_jax.config import LoraConfig, PruneConfig, TrainConfig  # noqa: E402
from loraprune_jax.io import load_model  # noqa: E402
from loraprune_jax.models.attention import causal_attention  # noqa: E402
from loraprune_jax.models.llama import logits_from_hidden, loss  # noqa: E402
from loraprune_jax.models.llama_params import stack_layers  # noqa: E402
from loraprune_jax.models.lora import init_lora  # noqa: E402
from loraprune_jax.models.llama_pruning import layer_scores  # noqa: E402
from loraprune_jax.models.llama_pruning import init_masks  # noqa: E402
from loraprune_jax.train.hostmem import keep_freed_memory  # noqa: E402
from loraprune_jax.train.step import clip_by_global_norm, init_state, make_optimizer, make_train_step  # noqa: E402


def measure(fn, *args, steps: int) -> tuple[float, float]:
    """Median seconds of a compiled ``fn(*args)`` and XLA's FLOP count for it."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(cost.get("flops", 0.0))


def profile(config, base, batch: int, seq: int, steps: int) -> list[tuple[str, float, float, str]]:
    lc, lc0 = LoraConfig(), LoraConfig(dropout=0.0)
    tc = TrainConfig(micro_batch_size=batch, seq_len=seq)
    masks = init_masks(config, stacked=True)
    lora = init_lora(jax.random.PRNGKey(0), base, lc)
    # a trained-looking B, so that no phase is a multiply by zeros
    lora = jax.tree.map(lambda x: x + 1e-3 * jnp.sign(x + 1e-9), lora)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)), jnp.int32)
    key = jax.random.PRNGKey(1)
    rows = []
    fwd_flops = forward_flops(config, batch, seq)
    adapter_flops = lora_flops(config, batch, seq, lc.rank)
    n = config.num_layers

    step = make_train_step(config, lc, tc, PruneConfig(criterion="lora"), donate=False, jit=False)
    state = init_state(lora, masks, tc)
    t_step, _ = measure(step, state, base, masks, {"tokens": toks[None]}, key, steps=steps)

    def fwd(l):
        return loss(base, l, masks, {"tokens": toks}, config, lc, rng=key)

    def grad(cfg):
        return jax.value_and_grad(lambda l: loss(base, l, masks, {"tokens": toks}, config, cfg, rng=key))

    t_f, _ = measure(fwd, lora, steps=steps)
    t_g, _ = measure(grad(lc), lora, steps=steps)
    t_g0, _ = measure(grad(lc0), lora, steps=steps)
    rows += [("forward", t_f, fwd_flops + adapter_flops, "in step"),
             ("backward", t_g - t_f, fwd_flops + 2 * adapter_flops, "in step"),
             ("dropout (fwd + bwd)", t_g - t_g0, 0.0, "in forward/backward")]

    q = jnp.ones((batch, seq, config.num_heads, config.head_dim)) * 0.1
    kv = jnp.ones((batch, seq, config.num_kv_heads, config.head_dim)) * 0.1

    def attn(q, k, v):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(causal_attention(q, k, v)), argnums=(0, 1, 2))(q, k, v)

    t_a, f_a = measure(attn, q, kv, kv, steps=steps)
    rows.append((f"attention x {n} layers", n * t_a, n * f_a, "in forward/backward"))

    hidden = jnp.ones((batch, seq, config.hidden_size)) * 0.01

    def head(h):
        def nll(h):
            logits = logits_from_hidden(base, h)[:, :-1]
            picked = jnp.take_along_axis(logits, toks[:, 1:, None], axis=-1)[..., 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)
        return jax.value_and_grad(nll)(h)

    rows.append(("lm head + loss", *measure(head, hidden, steps=steps), "in forward/backward"))

    grads = jax.jit(jax.grad(lambda l: loss(base, l, masks, {"tokens": toks}, config, lc, rng=key)))(lora)
    units = config.num_kv_heads

    def importance(lora, grads):
        return jax.lax.map(lambda xs: layer_scores("lora", xs[0], xs[1], units, scale=lc.scale,
                                                   lora_grads=xs[2]),
                           (base["layers"], lora["layers"], grads["layers"]))

    t_i, f_i = measure(importance, lora, grads, steps=steps)
    rows.append(("importance (lora, to groups)", t_i, n * f_i, "in step"))
    opt = make_optimizer(tc)
    opt_state = opt.init(lora)

    def update(lora, grads, opt_state):
        grads, _, _ = clip_by_global_norm(grads, tc.clip_norm)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state

    rows.append(("clip + AdamW", *measure(update, lora, grads, opt_state, steps=steps), "in step"))
    step_flops = 2 * fwd_flops + 3 * adapter_flops + n * f_i
    return [("step", t_step, step_flops, "all"), *rows]


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # as the CLI does (loraprune_jax.train.hostmem)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(1, 128), (2, 256), (4, 512)], metavar="BxT")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    config, base, _ = load_model(args.model, dtype="float32")
    base = stack_layers(base)
    peak = matmul_peak(dtype="float32")
    print(f"{args.model}, float32, {jax.devices()[0].device_kind}, {os.cpu_count()} cores; "
          f"jnp.dot peak {peak / 1e9:.0f} GFLOP/s")
    for batch, seq in args.shapes:
        rows = profile(config, base, batch, seq, args.steps)
        total = rows[0][1]
        print(f"\n{batch} x {seq} tokens\n")
        print("| phase | s | share of step | GFLOP (XLA) | GFLOP/s | of peak | part of |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for name, t, f, part in rows:
            rate = f / t if t > 0 else float("nan")
            print(f"| {name} | {t:.3f} | {t / total:.0%} | {f / 1e9:.1f} | {rate / 1e9:.0f} | "
                  f"{rate / peak:.0%} | {part} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
