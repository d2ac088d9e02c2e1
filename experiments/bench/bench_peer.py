"""Our LoRAPrune train step against the PyTorch stack of the paper's authors, side by side.

    python experiments/bench/bench_peer.py --shapes 1x128 2x256 4x512 --steps 5

Both sides train the same SmolLM2-135M weights (our HF export of the bundled model, loaded by
transformers' ``LlamaForCausalLM`` in float32, eager PyTorch, PEFT's LoRA) on the same random
token batches: LoRA r=8, alpha 16, dropout 0.05 on q, k, v, o, gate, up, down; AdamW (lr 1e-4,
no weight decay); gradient clipping at global norm 1.0; and the LoRA-guided importance with its
moving average (method.md sections 1-3: ``|(gB a + b gA - gB gA) * (W + s b a)|`` per weight, reduced
to output channels of q/k/v/gate/up and input channels of o/down, folded into a 0.9 moving
average). Each side runs in its own worker process, so neither imports or allocates inside
the other. The parent sends both the same batch in turn and collects the step times, so machine
noise hits both, and reports medians after two warm-up steps. Each worker also reports its page
faults and system seconds per step. Our worker first sets malloc to keep freed memory, as our
CLI does (``loraprune_jax.train.hostmem``; ``--ours-malloc system`` turns that off, and
``--torch-malloc keep`` gives PyTorch the same): with glibc's defaults every step faults its
buffers in again (at 4 x 512, 1.6 million faults and 9.7 s alone, 12.1 s in turn with PyTorch).
``--sides ours`` times one side alone. PyTorch runs on ``--threads`` threads (XLA uses every
core of the machine: run this on a machine with that many cores, or the comparison is not like
for like). With both sides, the last line is the ratio of the two median step times at each
shape (> 1: ours is faster).

Needs the ``bench`` extra (``pip install -e '.[bench]'``: torch and PEFT).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from loraprune_jax.config import EMA_BETA, LoraConfig, PruneConfig, TrainConfig
from loraprune_jax.io import export_hf, load_model
from loraprune_jax.models.llama_params import stack_layers
from loraprune_jax.models.lora import init_lora
from loraprune_jax.models.llama_pruning import init_masks
from loraprune_jax.train.hostmem import keep_freed_memory
from loraprune_jax.train.step import init_state, make_train_step

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_SIDE = ("o_proj", "down_proj")  # their groups are input channels; the others' are outputs


def parse_shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxSEQ_LEN (e.g. 2x256), got {text!r}") from None
    if batch < 1 or seq < 2:
        raise argparse.ArgumentTypeError(f"a shape needs batch >= 1 and seq_len >= 2, got {text!r}")
    return batch, seq


class TorchStep:
    """The authors' stack: transformers + PEFT, eager, one optimizer step per call."""

    def __init__(self, hf_dir: Path, lc: LoraConfig, lr: float, clip: float, beta: float, seed: int):
        import torch
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        peft_cfg = PeftLoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                  target_modules=list(TARGETS), bias="none")
        self.model = get_peft_model(model, peft_cfg)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.clip, self.beta, self.scale = clip, beta, lc.alpha / lc.rank
        self.layers = [(name, m) for name, m in self.model.named_modules()
                       if name.endswith(TARGETS) and hasattr(m, "lora_A")]
        self.scores = {name: None for name, _ in self.layers}
        self.torch = torch

    def __call__(self, tokens: np.ndarray) -> float:
        torch = self.torch
        ids = torch.from_numpy(tokens.astype(np.int64))
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        with torch.no_grad():
            for name, m in self.layers:
                a, b = m.lora_A["default"].weight, m.lora_B["default"].weight  # (r, in), (out, r)
                ga, gb = a.grad, b.grad
                est = gb @ a + b @ ga - gb @ ga  # the LoRA estimate of dL/dW, (out, in)
                merged = m.base_layer.weight + self.scale * (b @ a)
                elem = (est * merged).abs()
                new = elem.sum(dim=0 if name.endswith(INPUT_SIDE) else 1)
                old = self.scores[name]
                self.scores[name] = (1 - self.beta) * new if old is None else self.beta * old + (1 - self.beta) * new
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class OursStep:
    """Our compiled `lora` train step on the stacked model, the state carried between calls."""

    def __init__(self, model: str, batch: int, seq: int, seed: int):
        config, base, _ = load_model(model, dtype="float32")
        self.base = stack_layers(base)
        lc = LoraConfig()
        tc = TrainConfig(micro_batch_size=batch, seq_len=seq)
        self.masks = init_masks(config, stacked=True)
        self.state = init_state(init_lora(jax.random.PRNGKey(seed), self.base, lc), self.masks, tc)
        step = make_train_step(config, lc, tc, PruneConfig(criterion="lora"))
        example = {"tokens": jnp.zeros((1, batch, seq), jnp.int32)}
        self.step = step.lower(self.state, self.base, self.masks, example, jax.random.PRNGKey(0)).compile()
        self.calls = 0

    def __call__(self, tokens: np.ndarray) -> float:
        key = jax.random.fold_in(jax.random.PRNGKey(1), self.calls)
        self.calls += 1
        self.state, metrics = self.step(self.state, self.base, self.masks,
                                        {"tokens": jnp.asarray(tokens[None])}, key)
        return float(metrics["loss"])


def _serve(side: str, conn, model: str, hf_dir: str, batch: int, seq: int, threads: int,
           keep_memory: bool) -> None:
    """A worker process: build one side's step, then time one step per batch received."""
    if keep_memory:  # what our CLI does first thing (loraprune_jax.train.hostmem)
        keep_freed_memory()
    if side == "ours":
        fn = OursStep(model, batch, seq, seed=0)
    else:
        import torch

        torch.set_num_threads(threads)
        tc = TrainConfig()
        fn = TorchStep(Path(hf_dir), LoraConfig(), tc.lr, tc.clip_norm, EMA_BETA, seed=0)
    import resource

    conn.send("ready")
    while (tokens := conn.recv()) is not None:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = fn(tokens)
        seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        conn.send((seconds, loss, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))


def _side_by_side(args, hf_dir: Path, vocab: int, batch: int, seq: int) -> dict[str, tuple]:
    """``side -> (median step seconds, first step's loss, median page faults, median system
    seconds)`` at one shape, each side in its own process, in alternation. The first losses agree
    when both load the same weights (``B = 0``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    if args.malloc_hugepages:  # read by the workers' dynamic loader at start-up, both sides alike
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    workers = {}
    for side in args.sides:
        parent, child = ctx.Pipe()
        keep = (args.ours_malloc if side == "ours" else args.torch_malloc) == "keep"
        proc = ctx.Process(target=_serve, args=(side, child, args.model, str(hf_dir), batch, seq,
                                                args.threads, keep), daemon=True)
        proc.start()
        workers[side] = (proc, parent)
    try:
        for side, (proc, conn) in workers.items():
            if conn.recv() != "ready":
                raise RuntimeError(f"the {side} worker did not start")
        batches = np.random.RandomState(0).randint(0, vocab, (args.steps + 2, batch, seq)).astype(np.int32)
        times: dict[str, list[tuple]] = {side: [] for side in args.sides}
        first: dict[str, float] = {}
        for i, tokens in enumerate(batches):
            for side, (_, conn) in workers.items():
                conn.send(tokens)
                seconds, loss, faults, system = conn.recv()
                if not np.isfinite(loss):
                    raise RuntimeError(f"{side}: non-finite loss at step {i}")
                first.setdefault(side, loss)
                if i >= 2:  # two warm-up steps each
                    times[side].append((seconds, faults, system))
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    return {side: (statistics.median(t[0] for t in v), first[side], statistics.median(t[1] for t in v),
                   statistics.median(t[2] for t in v)) for side, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (bundled), a HF LLaMA directory or a .gguf")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(1, 128), (2, 256), (4, 512)],
                    metavar="BxT", help="batch x sequence length of one step (default 1x128 2x256 4x512)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and shape (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads (XLA uses every core)")
    ap.add_argument("--sides", nargs="+", default=["ours", "pytorch"], choices=["ours", "pytorch"],
                    help="which stacks to run (one alone: its time without the other in between)")
    ap.add_argument("--malloc-hugepages", action="store_true",
                    help="run both workers with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35: "
                         "large allocations on transparent huge pages, far fewer page faults)")
    ap.add_argument("--ours-malloc", choices=["keep", "system"], default="keep",
                    help="our worker's malloc: keep freed memory in-process as our CLI does "
                         "(loraprune_jax.train.hostmem, the default) or glibc's defaults")
    ap.add_argument("--torch-malloc", choices=["keep", "system"], default="system",
                    help="the PyTorch worker's malloc (default: glibc's defaults, as the authors run it)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    try:
        import peft  # noqa: F401
        import torch
    except ImportError as e:
        ap.error(f"{e.name} is not installed: pip install -e '.[bench]'")
    cores = os.cpu_count()
    config, base, tokenizer = load_model(args.model, dtype="float32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(Path(tmp) / "hf", config, base, tokenizer)
        for batch, seq in args.shapes:
            res = _side_by_side(args, hf_dir, config.vocab_size, batch, seq)
            rows.append((batch, seq, res))
            print(f"{batch}x{seq}: " + ", ".join(f"{k} {v[0]:.3f} s" for k, v in res.items()),
                  file=sys.stderr, flush=True)
    print(f"{args.model}, float32, {cores} cores (XLA), PyTorch {torch.__version__} on {args.threads} "
          f"threads, peft {peft.__version__}, jax {jax.__version__}; medians of {args.steps} steps"
          + f"; malloc: ours {args.ours_malloc}, PyTorch {args.torch_malloc}"
          + ("; workers with glibc.malloc.hugetlb=1" if args.malloc_hugepages else ""))
    print("| batch x seq | stack | step s | first loss | page faults per step | system s per step |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for batch, seq, res in rows:
        for side, (sec, loss, faults, system) in res.items():
            name = "ours" if side == "ours" else "PyTorch + PEFT"
            print(f"| {batch} x {seq} | {name} | {sec:.3f} | {loss:.4f} | {faults:.0f} | {system:.2f} |")
    if len(args.sides) == 2:
        print("ratio " + " ".join(f"{b}x{s} {r['pytorch'][0] / r['ours'][0]:.2f}x" for b, s, r in rows)
              + " (PyTorch step time / ours; > 1: ours faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
