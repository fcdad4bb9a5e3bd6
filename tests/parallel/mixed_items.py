"""A prompt file of every kind of item (one chunk, chained chunks, given frames) and a check
that two folders of sampled videos agree, for the mesh- and process-invariance tests.

Not a conftest.py (see tests/data/media.py); test modules import from here.
"""

import json

import numpy as np
from PIL import Image

from jaxvid.sample import writer

MIXED = [{"prompt": "a blue square moving up", "id": "t2v", "seed": 5},
         {"prompt": "a red circle moving left", "id": "long", "frames": 9},      # 4 chunks, chained
         {"prompt": "a green diamond", "id": "i2v", "image": "still.png", "frames": 6},
         {"prompt": "restyled", "id": "rs", "video": "clip.mp4", "strength": 0.7}]


def write_mixed_prompts(folder) -> str:
  """A prompt file of every kind of item (one-chunk, chained chunks, given frames), with media."""
  Image.fromarray(np.full((16, 16, 3), (20, 200, 20), np.uint8)).save(folder / "still.png")
  writer.write_mp4(folder / "clip.mp4", np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), np.uint8), fps=8)
  (folder / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MIXED))
  return str(folder / "p.jsonl")


def assert_same_videos(a, b, what):
  """Videos equal up to float reassociation: f32 sums in another order can move a pixel across a
  rounding boundary before the uint8 cast (1/255 on a few pixels), and H.264 can spread that
  one step over its block (seen: 12/255 on 0.5% of an 8-frame 32x32 video). Anything beyond
  that (a wrong token order, a missing block, noise from a batch position) moves many: even
  guidance 3.9 instead of 4 changes 23% of the pixels of a video, by up to 13."""
  for r in MIXED:
    expected = writer.read_mp4(a / f"{r['id']}.mp4").astype(int)
    video = writer.read_mp4(b / f"{r['id']}.mp4").astype(int)
    assert video.shape == expected.shape, (what, r["id"])
    assert np.abs(video - expected).max() <= 16, (what, r["id"])
    assert np.mean(video != expected) < 0.01, (what, r["id"])
