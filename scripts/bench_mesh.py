"""Per mesh: compile time, step time and per-device memory of the train step; and the longest
clip (in tokens) whose train step fits a per-device memory budget, with and without
sequence parallelism.

  python scripts/bench_mesh.py                                  # 8 simulated CPU devices
  python scripts/bench_mesh.py --budget_gb 80 --run_steps 5     # on 8 GPUs / TPU chips
  python scripts/bench_mesh.py --config configs/dit.py:B --config.model.depth=4 ...

Memory comes from XLA's analysis of the compiled step (`memory_analysis()`: arguments =
the state shard plus the batch shard, temp = activations and workspace); nothing is
allocated for it; it is that of one step a call. Steps run only where the whole job fits
`--host_gb` (CPU simulation), as `jaxvid train` runs them (train.steps_per_call steps a call,
a second compile).
Prints a Markdown table and one JSON object last.
"""

import argparse
import json
import os
import time

# Without accelerators, simulate 8 CPU devices (the flag only affects the CPU platform).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxvid import config as config_lib  # noqa: E402
from jaxvid.errors import UserError  # noqa: E402
from jaxvid.parallel import mesh as mesh_lib  # noqa: E402
from jaxvid.parallel import sharding  # noqa: E402
from jaxvid.perf import bench  # noqa: E402
from jaxvid.train import step as step_lib  # noqa: E402

# 8 frames of 64x64 pixels in 1x2x2 patches: 8 x 32 x 32 = 8,192 tokens per clip; DiT-S width
# with 8 heads (so Ulysses can split them 8 ways), 2 blocks so that CPUs can run it.
DEFAULT = ["--config.video.frames=8", "--config.video.height=64", "--config.video.width=64",
           "--config.model.depth=2", "--config.model.heads=8", "--config.model.dtype=float32",
           "--config.train.batch_size=8", "--config.text.max_len=32"]
MESHES = [((8, 1, 1, 1), "ulysses"), ((1, 8, 1, 1), "ulysses"), ((2, 2, 2, 1), "ulysses"),
          ((1, 2, 1, 4), "ulysses"), ((1, 1, 1, 8), "ulysses"), ((1, 1, 1, 8), "ring")]


def _cfg(spec, overrides, mesh, scheme, frames=None, batch=None):
  extra = [f"--config.mesh.{a}={s}" for a, s in zip(config_lib.MESH_AXES, mesh)]
  extra.append(f"--config.model.context_parallel={scheme}")
  if frames:
    extra.append(f"--config.video.frames={frames}")
  if batch:
    extra.append(f"--config.train.batch_size={batch}")
  cfg = config_lib.load(spec, overrides + extra)
  config_lib.validate(cfg, int(np.prod(mesh)), train=True)
  return cfg


def measure(cfg, run_steps: int, host_gb: float) -> dict:
  mesh = mesh_lib.make_mesh(cfg)
  t0 = time.time()
  compiled = step_lib.compile_for_mesh(cfg, mesh)
  row = {"compile_s": round(time.time() - t0, 1)}
  mem = compiled.memory_analysis()
  row.update(state_and_batch_mb=round(mem.argument_size_in_bytes / 2**20, 1),
             temp_mb=round(mem.temp_size_in_bytes / 2**20, 1))
  total_gb = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes) * mesh.size / 2**30
  on_cpu = jax.devices()[0].platform == "cpu"
  if run_steps and (not on_cpu or total_gb <= host_gb):
    # The step as `jaxvid train` runs it (train.steps_per_call steps a call), compiled again with its state.
    train = bench.TrainCall(cfg, mesh, sharding.rules_from_config(cfg))
    row["step_s"] = round(float(np.median(bench.per_step_times(train, train.per_call, run_steps, warmup=1))), 3)
    row["steps_per_call"] = train.per_call
  else:
    row["step_s"] = row["steps_per_call"] = None
  return row


def split_one_clip(spec, overrides, scheme) -> list[dict]:
  """Per-device memory of the train step on one clip (batch 1) split over 1, 2, 4, ... devices."""
  rows, n = [], 1
  while n <= jax.device_count():
    cfg = _cfg(spec, overrides, (1, 1, 1, n), scheme, batch=1)
    mem = step_lib.compile_for_mesh(cfg, mesh_lib.make_mesh(cfg, jax.devices()[:n])).memory_analysis()
    rows.append({"sequence": n, "context_parallel": scheme, "state_and_batch_mb": round(mem.argument_size_in_bytes / 2**20, 1),
                 "temp_mb": round(mem.temp_size_in_bytes / 2**20, 1)})
    print(rows[-1], flush=True)
    n *= 2
  return rows


def longest(spec, overrides, mesh, scheme, batch, budget_gb: float, frames: int) -> int:
  """The longest clip (frames doubling from `frames`) whose per-device memory fits the budget, in tokens."""
  best = 0
  while frames <= 4096:
    try:
      cfg = _cfg(spec, overrides, mesh, scheme, frames, batch)
    except UserError:              # the clip no longer fits the mesh's divisibility rules
      break
    m = mesh_lib.make_mesh(cfg)
    mem = step_lib.compile_for_mesh(cfg, m).memory_analysis()
    used = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**30
    tokens = config_lib.num_tokens(cfg)
    print(f"  mesh {mesh} {scheme}: {tokens} tokens -> {used:.2f} GB per device", flush=True)
    if used > budget_gb:
      break
    best, frames = tokens, frames * 2
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/dit.py:S")
  p.add_argument("--run_steps", type=int, default=3, help="timed steps per mesh (0: compile only)")
  p.add_argument("--host_gb", type=float, default=16.0, help="CPU only: skip running meshes needing more")
  p.add_argument("--budget_gb", type=float, default=2.0, help="per-device memory for the longest-clip search")
  args, overrides = p.parse_known_args()
  overrides = DEFAULT + [o for o in overrides if o.startswith("--config.")]
  n = jax.device_count()
  rows = []
  for mesh, scheme in MESHES:
    cfg = _cfg(args.config, overrides, mesh, scheme)
    row = {"mesh": mesh, "context_parallel": scheme if mesh[3] > 1 else "-", "tokens": config_lib.num_tokens(cfg)}
    row.update(measure(cfg, args.run_steps, args.host_gb))
    print(row, flush=True)
    rows.append(row)
  split = split_one_clip(args.config, overrides, "ring") + split_one_clip(args.config, overrides, "ulysses")[1:]
  cfg = _cfg(args.config, overrides, (n, 1, 1, 1), "ulysses")
  first = cfg.model.patch[0]          # the shortest clip: one latent frame
  # One clip per device with data parallelism, versus one clip split over all devices.
  search = {
      "budget_gb_per_device": args.budget_gb,
      "without_sequence_parallel": longest(args.config, overrides, (n, 1, 1, 1), "ulysses", n, args.budget_gb, first),
      "with_sequence_parallel": longest(args.config, overrides, (1, 1, 1, n), "ring", 1, args.budget_gb, first),
  }
  print("\n| mesh (data, fsdp, tensor, sequence) | attention | tokens | compile s | step s | state+batch MB/device | temp MB/device |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    step = "-" if r["step_s"] is None else r["step_s"]
    print(f"| {r['mesh']} | {r['context_parallel']} | {r['tokens']} | {r['compile_s']} | {step} | "
          f"{r['state_and_batch_mb']} | {r['temp_mb']} |")
  print("\n| one clip split over sequence= | attention | state+batch MB/device | temp MB/device |")
  print("| --- | --- | --- | --- |")
  for r in split:
    print(f"| {r['sequence']} | {r['context_parallel']} | {r['state_and_batch_mb']} | {r['temp_mb']} |")
  print(f"\nlongest clip within {args.budget_gb} GB per device: {search['without_sequence_parallel']} tokens "
        f"(one clip per device, data={n}), {search['with_sequence_parallel']} tokens (one clip over "
        f"sequence={n}, ring attention)")
  print(json.dumps({"config": args.config, "overrides": overrides, "device": jax.devices()[0].device_kind,
                    "devices": n, "rows": rows, "split_one_clip": split,
                    "longest": search}))


if __name__ == "__main__":
  main()
