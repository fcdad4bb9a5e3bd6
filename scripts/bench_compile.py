"""Compile time against depth: the blocks run under one `lax.scan`, so a deep model should
compile about as fast as a shallow one.

  python scripts/bench_compile.py                          # configs/bench_cpu.py, depth 4 vs 28
  python scripts/bench_compile.py --config configs/dit.py:XL --depths 4 28 --config.model.remat=full

Compiles the real train step from abstract inputs (jaxvid.train.step.compile_for_mesh: nothing
is allocated) on one device, for each depth, and reports seconds and the ratio to the first
depth. The layers are scanned one block at a time (`model.scan_unroll=1`, which an override
may change; configs/bench_cpu.py itself unrolls its 8). Prints a table, then one JSON line.
"""

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402

from jaxvid import config  # noqa: E402
from jaxvid.parallel import distributed  # noqa: E402
from jaxvid.parallel import mesh as mesh_lib  # noqa: E402
from jaxvid.train import step as step_lib  # noqa: E402

distributed.set_xla_cpu_flags()   # XLA:CPU as jaxvid's commands set it up (before JAX makes a device)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/bench_cpu.py")
  parser.add_argument("--depths", type=int, nargs="+", default=[4, 28])
  args, overrides = parser.parse_known_args()
  rows = []
  for depth in args.depths:
    cfg = config.load(args.config, ["--config.model.scan_unroll=1", *overrides, f"--config.model.depth={depth}"])
    config.validate(cfg, jax.device_count(), train=True)
    jax.clear_caches()
    t0 = time.perf_counter()
    step_lib.compile_for_mesh(cfg, mesh_lib.make_mesh(cfg))
    rows.append({"depth": depth, "compile_s": time.perf_counter() - t0})
  for r in rows:
    r["ratio"] = r["compile_s"] / rows[0]["compile_s"]
    print(f"depth {r['depth']:>3}  compile {r['compile_s']:6.1f} s  x{r['ratio']:.2f}")
  print(json.dumps({"config": args.config, "overrides": overrides, "rows": rows, "device": str(jax.devices()[0])}))


if __name__ == "__main__":
  main()
