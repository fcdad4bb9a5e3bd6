"""Cost of checkpointing: the train loop with a checkpoint every step versus only at the end.

  python scripts/bench_checkpoint.py --steps 20 [--every 1] [--config configs/dit.py:S] [--config.KEY=VALUE ...]

With a step much shorter than a write (the default tiny clip), saving every step measures the
full cost of a save; with a longer step and `--every` > 1 (a bigger clip), it measures how much
of that cost async saving hides behind training.

Uses a model whose train state (parameters, two Adam moments, EMA) is at least 100 MB and a
tiny clip, so the step is short and the checkpoint cost shows. Prints one JSON object last.
"""

import argparse
import json
import os
import tempfile
import time

import jax

from jaxvid import config as config_lib
from jaxvid.train import loop
from jaxvid.train import state as state_lib

SMALL_CLIP = ["--config.video.frames=2", "--config.video.height=16", "--config.video.width=16",
              "--config.train.batch_size=2", "--config.model.dtype=float32", "--config.train.log_every=1000"]


def run(spec: str, overrides: list[str], steps: int, every: int, async_save: bool) -> float:
  cfg = config_lib.load(spec, SMALL_CLIP + overrides + [
      f"--config.train.steps={steps}", f"--config.checkpoint.every={every}", "--config.checkpoint.keep=2",
      f"--config.checkpoint.async_save={str(async_save).lower()}"])
  with tempfile.TemporaryDirectory() as workdir:
    loop.train(cfg, os.path.join(workdir, "run"))   # warm-up run: compiles and caches
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.time()
    loop.train(cfg, os.path.join(workdir, "run"))
    return time.time() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/dit.py:S")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--every", type=int, default=1, help="checkpoint.every of the measured runs")
  args, overrides = p.parse_known_args()
  if args.steps % args.every or args.steps // args.every < 2:
    p.error("--steps must be a multiple of --every, at least twice it")
  cfg = config_lib.load(args.config, SMALL_CLIP + overrides)
  tx, _ = state_lib.make_optimizer(cfg)
  _, _, abstract = state_lib.abstract_state(cfg, tx)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  never = run(args.config, overrides, args.steps, args.steps, True)   # one save, at the end
  every_async = run(args.config, overrides, args.steps, args.every, True)
  every_sync = run(args.config, overrides, args.steps, args.every, False)
  extra_saves = args.steps // args.every - 1
  report = {
      "config": args.config, "overrides": overrides, "steps": args.steps, "every": args.every,
      "state_mb": round(state_bytes / 2**20, 1),
      "loop_s_checkpoint_at_end": round(never, 2),
      "loop_s_checkpoint_every_async": round(every_async, 2),
      "loop_s_checkpoint_every_sync": round(every_sync, 2),
      "overhead_per_checkpoint_s_async": round((every_async - never) / extra_saves, 3),
      "overhead_per_checkpoint_s_sync": round((every_sync - never) / extra_saves, 3),
      "device": jax.devices()[0].device_kind,
  }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
