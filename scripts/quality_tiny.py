"""Prompt adherence of the `tiny` model on the synthetic data: train, sample held-out prompts,
detect the moving object's color and direction from pixels, report accuracy against chance.

  python scripts/quality_tiny.py --workdir runs/quality [--steps 2000] [--minutes 20] [--config.KEY=VALUE ...]

Steps 1 and 2 run the real CLI (`jaxvid train`, `jaxvid sample`); rerunning resumes both.
Training stops at `--steps` or after `--minutes`, whichever comes first: at the deadline the
script sends SIGTERM, and the trainer saves a checkpoint at the next step and exits 0.
The held-out prompts are captions whose (color, shape, direction, background) combination
never appears in training (each word does). Prints one JSON object last and writes it to
WORKDIR/quality.json, with a picture of samples in WORKDIR/samples.png.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from jaxvid.data import synthetic
from jaxvid.sample import writer

import budget   # scripts/budget.py


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="runs/quality")
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--steps", type=int, default=2000, help="train.steps (the run stops earlier at --minutes)")
  p.add_argument("--minutes", type=float, default=20.0, help="training time limit of this invocation")
  p.add_argument("--prompts", type=int, default=64)
  args, overrides = p.parse_known_args()
  args.overrides = [o for o in overrides if o.startswith("--config.")]
  if len(args.overrides) != len(overrides):
    p.error(f"unrecognized arguments: {[o for o in overrides if not o.startswith('--config.')]}")
  os.makedirs(args.workdir, exist_ok=True)

  train_s = budget.train_for("quality_tiny", args.minutes, ["--config", args.config, "--workdir", args.workdir,
                                                            f"--config.train.steps={args.steps}", *args.overrides])

  scenes = synthetic.heldout_scenes(args.prompts, seed=1234)
  prompts = os.path.join(args.workdir, "heldout_prompts.jsonl")
  with open(prompts, "w") as f:
    for i, s in enumerate(scenes):
      f.write(json.dumps({"id": f"heldout-{i:03d}", "prompt": s.caption, "seed": i}) + "\n")
  out = os.path.join(args.workdir, "samples")
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "jaxvid", "sample", "--workdir", args.workdir, "--prompts", prompts,
                  "--output", out, *args.overrides], check=True)
  sample_s = time.time() - t0

  color_ok = direction_ok = 0
  rows = []
  for i, s in enumerate(scenes):
    video = writer.read_mp4(os.path.join(out, f"heldout-{i:03d}.mp4"))
    color, direction = synthetic.detect(video)
    color_ok += color == s.color
    direction_ok += direction == s.direction
    rows.append(video)
  _picture(rows[:8], [s.caption for s in scenes[:8]], os.path.join(args.workdir, "samples.png"))

  with open(os.path.join(out, "heldout-000.json")) as f:
    trained_step = json.load(f)["checkpoint_step"]
  with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  report = {
      "prompts": len(scenes), "heldout_combinations": True,
      "color_accuracy": color_ok / len(scenes), "color_chance": 1 / len(synthetic.COLORS),
      "direction_accuracy": direction_ok / len(scenes), "direction_chance": 1 / len(synthetic.DIRECTIONS),
      "train_steps": trained_step, "train_steps_asked": args.steps, "last_logged_loss": last["loss"],
      "train_seconds": round(train_s, 1),
      "sample_seconds": round(sample_s, 1), "config": args.config, "overrides": args.overrides,
  }
  with open(os.path.join(args.workdir, "quality.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))


def _picture(videos: list[np.ndarray], captions: list[str], path: str, scale: int = 3) -> None:
  """A PNG grid: one row per video, its frames left to right, upscaled `scale`x."""
  rows = [np.concatenate(list(v), axis=1) for v in videos]
  grid = np.concatenate(rows, axis=0)
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
  main()
