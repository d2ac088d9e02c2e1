"""Peak host memory per process of placing a HF checkpoint on a multi-process mesh: the eager
whole load (``load_hf_dir(as_numpy=True)`` then ``shard_base``) against the lazy shard-by-shard
read (``load_hf_dir(lazy=True)`` then ``shard_base``: each process reads from the safetensors
files only the slices its devices hold).

    .venv/bin/python experiments/sharded_load_memory.py --dir /tmp/sharded_load_ckpt

writes a random LLaMA-shaped bf16 checkpoint (hidden 1024, 8 layers, vocab 32000, MLP 2816,
untied LM head: about 335 MB) into ``--dir`` unless one is there, then for each way launches
``--processes`` (2) local processes joined by ``jax.distributed`` with ``--devices`` (4) simulated
CPU devices each, loading onto mesh ``fsdp:-1`` (8 devices). Each way runs in its own process
group, so each peak (``VmHWM`` of ``/proc/self/status``) is clean; the baseline is ``VmRSS`` after
``import jax``, the distributed initialization and building the mesh. Both ways must place the
same values (per-process checksums of the local shards are compared).

On CPU the simulated devices' shards live in host memory too, so the lazy peak is about
baseline + (1 / processes of the model, the process's own shards) + a transient chunk of at most
``io.lazy.CHUNK_BYTES`` and one tensor's local shards before they are handed to the devices; the
eager peak adds the whole model on top of that.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmHWM``, ``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def write_checkpoint(path: Path, hidden: int, layers: int, vocab: int, ffn: int, heads: int,
                     dtype: str = "bfloat16", seed: int = 0) -> int:
    """A random LLaMA-shaped HF checkpoint at ``path`` (kept when one is there); its bytes."""
    from loraprune_jax.config import LlamaConfig
    from loraprune_jax.io.hf import np_dtype, save_hf_dir
    from loraprune_jax.models.llama_params import param_shapes

    if not (path / "config.json").is_file():
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                             num_layers=layers, num_heads=heads, num_kv_heads=heads,
                             head_dim=hidden // heads, tie_word_embeddings=False, dtype=dtype)
        rng, dt = np.random.default_rng(seed), np_dtype(dtype)

        def draw(shape: tuple[int, ...]) -> np.ndarray:
            return (0.02 * rng.standard_normal(shape, np.float32)).astype(dt)

        shapes = param_shapes(config)
        base: dict[str, Any] = {k: draw(v) for k, v in shapes.items() if k != "layers"}
        base["layers"] = [{k: draw(v) for k, v in layer.items()} for layer in shapes["layers"]]
        save_hf_dir(path, config, base, max_shard_bytes=128 * 2**20)
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def worker(mode: str, ckpt: Path, mesh_spec: str, result: Path) -> None:
    """One process of a group: place ``ckpt`` on the mesh ``mode``'s way and record memory."""
    import jax

    from loraprune_jax.io.hf import load_hf_dir
    from loraprune_jax.models.llama_params import shard_base
    from loraprune_jax.parallel import distributed
    from loraprune_jax.parallel.mesh import make_mesh

    distributed.initialize()
    mesh = make_mesh(mesh_spec)
    baseline = _status("VmRSS")
    config, host, _ = load_hf_dir(ckpt, as_numpy=mode == "eager", lazy=mode == "lazy")
    placed = jax.block_until_ready(shard_base(host, config, mesh))
    peak = _status("VmHWM")
    local = checksum = 0.0
    for leaf in jax.tree.leaves(placed):
        for shard in leaf.addressable_shards:
            data = np.asarray(shard.data)
            local += data.nbytes
            checksum += float(data.astype(np.float64).sum())
    result.write_text(json.dumps({"process": jax.process_index(), "baseline": baseline,
                                  "peak": peak, "local_shards": local, "checksum": checksum}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(mode: str, ckpt: Path, processes: int, devices: int, mesh_spec: str,
              work: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """Launch ``processes`` workers on localhost for ``mode``; their results by process."""
    port, procs = _free_port(), []
    root = Path(__file__).resolve().parent.parent
    for pid in range(processes):
        env = dict(os.environ)
        env.update({"JAX_PLATFORMS": "cpu",
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                    "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(pid),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))})
        out = work / f"{mode}{pid}.json"
        out.unlink(missing_ok=True)
        log = open(work / f"{mode}{pid}.log", "w")
        cmd = [sys.executable, __file__, "--worker", mode, "--dir", str(ckpt), "--mesh", mesh_spec,
               "--result", str(out)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=timeout) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    if any(codes):
        logs = "\n".join((work / f"{mode}{i}.log").read_text()[-3000:] for i in range(processes))
        raise RuntimeError(f"{mode} workers exited with {codes}:\n{logs}")
    return [json.loads((work / f"{mode}{i}.json").read_text()) for i in range(processes)]


def measure(ckpt: Path, processes: int = 2, devices: int = 4, mesh_spec: str = "fsdp:-1",
            work: Path | None = None) -> dict[str, Any]:
    """Both ways on ``ckpt``: ``{"checkpoint": bytes, "eager": [...], "lazy": [...]}`` with
    each process's ``baseline``, ``peak``, ``local_shards`` (bytes) and ``checksum``."""
    work = work or ckpt.parent / f"{ckpt.name}-runs"
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"checkpoint": sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))}
    for mode in ("eager", "lazy"):
        out[mode] = run_group(mode, ckpt, processes, devices, mesh_spec, work)
    for a, b in zip(out["eager"], out["lazy"]):
        if a["checksum"] != b["checksum"]:
            raise AssertionError(f"process {a['process']}: eager and lazy placed different values")
    return out


def table(res: dict[str, Any]) -> str:
    """The markdown table of :func:`measure`'s result (MB = 10^6 bytes)."""
    mb = lambda b: f"{b / 1e6:.0f}"  # noqa: E731
    rows = ["| way | process | baseline MB | peak MB | peak - baseline MB | local shards MB "
            "| checkpoint MB |", "|---|---|---|---|---|---|---|"]
    for mode in ("eager", "lazy"):
        for r in res[mode]:
            rows.append(f"| {mode} | {r['process']} | {mb(r['baseline'])} | {mb(r['peak'])} | "
                        f"{mb(r['peak'] - r['baseline'])} | {mb(r['local_shards'])} | "
                        f"{mb(res['checkpoint'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sharded_load_ckpt"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--mesh", default="fsdp:-1")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    ap.add_argument("--worker", choices=("eager", "lazy"), help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.dir, args.mesh, args.result)
        return 0
    size = write_checkpoint(args.dir, args.hidden, args.layers, args.vocab, args.ffn, args.heads,
                            args.dtype)
    print(f"checkpoint {args.dir}: {size / 1e6:.0f} MB; {args.processes} processes x "
          f"{args.devices} CPU devices, mesh {args.mesh}", flush=True)
    res = measure(args.dir, args.processes, args.devices, args.mesh)
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
