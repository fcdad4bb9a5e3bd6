"""Attention backends side by side: forward and forward+backward time (jit, median after a
warm-up), per shape, on this machine's default device.

  python scripts/bench_attention.py                               # xla vs blocked, default shapes
  python scripts/bench_attention.py --reps 7 --blocks 128x128,256x256,512x512,256x512
  python scripts/bench_attention.py --shapes 2x2048x6x64 --backends xla,blocked,cudnn --dtype bfloat16

A shape is BxNqxHEADSxK (self-attention) or BxNqxHEADSxK:Nk (cross-attention to Nk keys, with a
key mask that drops the last quarter, as text padding would). The default shapes are the CPU
comparison model's (width 384 = 6 heads of 64, 2,048 video tokens a clip, batch 2, 32 text
tokens) and one long clip. Variants are timed round-robin, one call each in turn, so that a
machine busy with other work slows them all alike. Prints a Markdown table and one JSON
object last; `--blocks` adds blocked variants with other tile sizes (block_q x block_k).
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxvid.models import attention
from jaxvid.parallel import distributed

distributed.set_xla_cpu_flags()   # XLA:CPU as jaxvid's commands set it up (before JAX makes a device)

SHAPES = "2x2048x6x64,2x2048x6x64:32,1x8192x6x64"


def parse_shape(text: str) -> tuple[int, int, int, int, int | None]:
  dims, _, nk = text.partition(":")
  b, nq, heads, k = (int(x) for x in dims.split("x"))
  return b, nq, heads, k, int(nk) if nk else None


def variants(backends: list[str], blocks: list[str]) -> dict:
  """name -> attend(q, k, v, mask)."""
  out = {name: (lambda q, k, v, m, name=name: attention.attend(q, k, v, m, name)) for name in backends}
  for spec in blocks:
    bq, bk = (int(x) for x in spec.split("x"))
    out[f"blocked {bq}x{bk}"] = (lambda q, k, v, m, bq=bq, bk=bk:
                                 attention.blocked_attention(q, k, v, m, block_q=bq, block_k=bk))
  return out


def bench_shape(shape, fns: dict, dtype, reps: int) -> list[dict]:
  b, nq, heads, dim, nk = shape
  cross = nk is not None
  nk = nk or nq
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, nq, heads, dim), dtype)
  k = jax.random.normal(keys[1], (b, nk, heads, dim), dtype)
  v = jax.random.normal(keys[2], (b, nk, heads, dim), dtype)
  w = jax.random.normal(keys[3], q.shape, dtype)
  mask = jnp.arange(nk)[None].repeat(b, 0) < nk - nk // 4 if cross else None

  timed = {}
  for name, fn in fns.items():
    fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, mask))
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * w),
                            argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    fwd, grad = fwd.lower(q, k, v).compile(), grad.lower(q, k, v).compile()
    jax.block_until_ready(fwd(q, k, v))
    jax.block_until_ready(grad(q, k, v))
    memory = grad.memory_analysis()      # XLA's plan for the compiled fwd+bwd: scratch beyond in/out
    timed[name] = {"fns": (fwd, grad), "times": ([], []), "compile_s": time.perf_counter() - t0,
                   "temp_bytes": None if memory is None else memory.temp_size_in_bytes}
  for _ in range(reps):
    for entry in timed.values():
      for fn, times in zip(entry["fns"], entry["times"]):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        times.append(time.perf_counter() - t0)
  rows = []
  for name, entry in timed.items():
    fwd_s, grad_s = (statistics.median(t) for t in entry["times"])
    rows.append({"shape": f"B={b} Nq={nq} Nk={nk} heads={heads} K={dim}" + (" masked" if cross else ""),
                 "backend": name, "forward_s": round(fwd_s, 4), "forward_backward_s": round(grad_s, 4),
                 "forward_min_s": round(min(entry["times"][0]), 4),
                 "forward_backward_min_s": round(min(entry["times"][1]), 4),
                 "warmup_s": round(entry["compile_s"], 2), "fwd_bwd_temp_bytes": entry["temp_bytes"], "auto_picks": attention.resolve("auto", q, k)})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", default=SHAPES, help="comma-separated BxNqxHEADSxK[:Nk]")
  parser.add_argument("--backends", default="xla,blocked", help=f"comma-separated, of {attention.BACKENDS}")
  parser.add_argument("--blocks", default="", help="extra blocked tile sizes, comma-separated QxK")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()

  backends = [b for b in args.backends.split(",") if b]
  fns = variants(backends, [s for s in args.blocks.split(",") if s])
  load_before = os.getloadavg()
  rows = []
  for spec in args.shapes.split(","):
    rows += bench_shape(parse_shape(spec), fns, jnp.dtype(args.dtype), args.reps)

  print(f"\n| shape | backend | forward ms | fwd+bwd ms | fwd+bwd vs {backends[0]} | fwd+bwd temp MB | auto picks |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  base = {r["shape"]: r["forward_backward_s"] for r in rows if r["backend"] == backends[0]}
  for r in rows:
    print(f"| {r['shape']} | {r['backend']} | {r['forward_s'] * 1e3:.1f} | {r['forward_backward_s'] * 1e3:.1f} | "
          f"{base[r['shape']] / r['forward_backward_s']:.2f}x | {(r['fwd_bwd_temp_bytes'] or 0) / 2**20:.0f} | "
          f"{r['auto_picks']} |")
  print(json.dumps({"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
                    "dtype": args.dtype, "reps": args.reps, "cpu_count": os.cpu_count(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()], "results": rows}))


if __name__ == "__main__":
  main()
