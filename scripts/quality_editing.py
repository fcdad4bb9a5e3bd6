"""Editing quality of a trained `tiny` run (model.condition=mask) on the synthetic data:
extension, image-to-video and long videos, each through the real `jaxvid sample`.

  python scripts/quality_editing.py --workdir runs/quality [--n 64] [--config.KEY=VALUE ...]

On held-out scenes (combinations of color, shape, direction and background never trained on):

  extend          the first K = sample.context_frames frames of a real clip (default about half) are
                  extended to video.frames;
                  the direction of the object in the new frames, read from pixels
                  (synthetic.detect), should be the clip's
  image-to-video  the first frame of a real clip and its caption; the object's color in the
                  generated frames should be the first frame's
  long            text-to-video of 4 x video.frames frames, chunk by chunk; the seam metric is
                  the mean frame-to-frame change (mean |frame[i] - frame[i-1]| over pixels) at the
                  first new frame of each chunk, against the same inside chunks (1.0: seamless)

Prints one JSON object last and writes it to WORKDIR/editing.json, with a picture of a few
results in WORKDIR/editing.png.
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
from jaxvid.sample import chunks
from jaxvid.sample import job
from jaxvid.sample import writer


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a run trained with model.condition=mask")
  p.add_argument("--n", type=int, default=64, help="held-out scenes per mode")
  args, overrides = p.parse_known_args()
  if any(not o.startswith("--config.") for o in overrides):
    p.error(f"unrecognized arguments: {[o for o in overrides if not o.startswith('--config.')]}")
  cfg = job.load_run_config(args.workdir, overrides)
  v = cfg.video
  half = chunks.context_frames(cfg)       # the given part: the model's context (T / 2 in pixels)
  root = os.path.join(args.workdir, "editing")
  media = os.path.join(root, "inputs")
  os.makedirs(media, exist_ok=True)

  scenes = synthetic.heldout_scenes(args.n, seed=4321)
  ext_rows, i2v_rows, long_rows = [], [], []
  for i, s in enumerate(scenes):
    clip = synthetic.render(s, v.frames, v.height, v.width)
    writer.write_mp4(os.path.join(media, f"half-{i:03d}.mp4"), clip[:half], v.fps)
    Image.fromarray(clip[0]).save(os.path.join(media, f"first-{i:03d}.png"))
    ext_rows.append({"id": f"extend-{i:03d}", "prompt": s.caption, "seed": i,
                     "video": f"inputs/half-{i:03d}.mp4", "extend": v.frames - half})
    i2v_rows.append({"id": f"i2v-{i:03d}", "prompt": s.caption, "seed": i, "image": f"inputs/first-{i:03d}.png"})
    long_rows.append({"id": f"long-{i:03d}", "prompt": s.caption, "seed": i, "frames": 4 * v.frames})
  with open(os.path.join(root, "prompts.jsonl"), "w") as f:
    for row in ext_rows + i2v_rows + long_rows:
      f.write(json.dumps(row) + "\n")

  out = os.path.join(root, "samples")
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "jaxvid", "sample", "--workdir", args.workdir, "--prompts",
                  os.path.join(root, "prompts.jsonl"), "--output", out, "--strict", *overrides], check=True)
  sample_s = time.time() - t0
  read = lambda item_id: writer.read_mp4(os.path.join(out, f"{item_id}.mp4"))

  direction_ok = 0
  for s, row in zip(scenes, ext_rows):
    _, direction = synthetic.detect(read(row["id"])[half:])        # the new frames only
    direction_ok += direction == s.direction
  color_ok = 0
  for s, row in zip(scenes, i2v_rows):
    color, _ = synthetic.detect(read(row["id"])[1:])               # the generated frames only
    color_ok += color == s.color

  context = chunks.context_frames(cfg)
  firsts = list(range(v.frames, 4 * v.frames, v.frames - context))   # first new frame of chunks 2, 3, ...
  at_seams, inside = [], []
  for row in long_rows:
    video = read(row["id"]).astype(np.float32)
    change = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))      # [F - 1]: change into frame i + 1
    seam = np.isin(np.arange(1, len(video)), firsts)
    at_seams.append(change[seam].mean())
    inside.append(change[~seam].mean())

  report = {
      "scenes": args.n, "heldout_combinations": True, "workdir": args.workdir,
      "extend_direction_accuracy": direction_ok / args.n, "direction_chance": 1 / len(synthetic.DIRECTIONS),
      "i2v_color_accuracy": color_ok / args.n, "color_chance": 1 / len(synthetic.COLORS),
      "long_frames": 4 * v.frames, "long_chunks": 1 + len(firsts),
      "seam_change": float(np.mean(at_seams)), "inside_change": float(np.mean(inside)),
      "seam_ratio": float(np.mean(at_seams) / np.mean(inside)),
      "sample_seconds": round(sample_s, 1), "sampler": cfg.sample.sampler, "steps": cfg.sample.steps,
      "overrides": overrides,
  }
  rows = [read(r["id"]) for r in (ext_rows[:2] + i2v_rows[:2])] + [read(long_rows[0]["id"])[:2 * v.frames]]
  _picture(rows, os.path.join(args.workdir, "editing.png"))
  with open(os.path.join(args.workdir, "editing.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))


def _picture(videos: list[np.ndarray], path: str, scale: int = 3) -> None:
  """A PNG grid: one row per video (shorter ones padded with white), frames left to right."""
  width = max(len(v) for v in videos)
  rows = [np.concatenate(list(v) + [np.full_like(v[0], 255)] * (width - len(v)), axis=1) for v in videos]
  grid = np.concatenate(rows, axis=0)
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
  main()
