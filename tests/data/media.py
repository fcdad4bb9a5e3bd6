"""Real media files for the data tests: small videos in three containers, images, damaged
files and manifests over them, written once per test process (`media` fixture).

Not a conftest.py: the tests import `from conftest import ...` from tests/conftest.py, which
a second conftest.py module would shadow. Test modules import the fixture from here.
"""

import dataclasses
import json
import os
import struct

import imageio.v3 as iio
import numpy as np
from PIL import Image
import pytest

from conftest import SMALL, TINY
from jaxvid import config
from jaxvid.data import synthetic

SEED = 11

# Buckets of every files-source test: two clip shapes of 4 frames (square and 2:3) and images.
# patch (1, 4, 4) lets a one-frame bucket exist (the tiny config's time patch is 2).
BUCKETS = "((4,16,16),(4,16,24),(1,16,16))"
FILES = ["--config.data.source=files", "--config.model.patch=(1,4,4)", f"--config.data.buckets={BUCKETS}"]

# What the dataset holds, by file name. Videos are 2 s at 8 fps unless said otherwise.
SQUARE = ["sq0.mp4", "sq1.mp4", "sq2.mp4", "sq3.webm", "sq4.gif"]   # 32x32 -> bucket 4x16x16
WIDE = ["wd0.mp4", "wd1.mp4", "wd2.webm", "wd3.mp4"]                # 32x48 -> bucket 4x16x24
LONG = "long.mp4"        # 32x48, 48 frames at 16 fps, frame i a flat gray of RAMP[i]; its entry is
                         # the window 0.5 s .. 2.5 s sampled at 8 fps (16 frames) -> bucket 4x16x24
IMAGES = ["im0.png", "im1.png", "im2.png"]                          # one-frame bucket 1x16x16
# Damaged entries dropped when the manifest is probed:
STARTUP_BAD = ["empty.mp4",     # zero bytes
               "text.mp4",      # a text file named .mp4
               "broken.mp4",    # an mp4 cut in half: its moov atom (at the end) is gone
               "short.mp4",     # a real video of 2 frames, too short for any 4-frame bucket
               "missing.mp4"]   # no such file
# Damaged entries that probe fine and fail when decoded: a +faststart mp4 (moov first, 6 s
# long by its header) cut after its first frame. Its shape puts it in the square bucket.
DECODE_BAD = ["cut.mp4"]

RAMP = 10 + 4 * np.arange(48)     # gray level of frame i of LONG


def scene_frames(index: int, frames: int, height: int, width: int) -> np.ndarray:
  return synthetic.render(synthetic.make_scene(SEED, index), frames, height, width)


def ramp_frames(levels, height: int, width: int) -> np.ndarray:
  """uint8 [len(levels), height, width, 3]: frame i a flat gray of levels[i]."""
  levels = np.asarray(levels, np.uint8)
  return np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (len(levels), height, width, 3)))


def write_mp4(path, frames, fps=8, faststart=False):
  extra = {"output_params": ["-movflags", "+faststart"]} if faststart else {}
  iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1, **extra)


def write_webm(path, frames, fps=8):
  iio.imwrite(path, frames, fps=fps, codec="libvpx-vp9", macro_block_size=1)


def write_gif(path, frames):
  iio.imwrite(path, frames, duration=125, loop=0)


def write_video(path, frames):
  path = str(path)
  if path.endswith(".webm"):
    write_webm(path, frames)
  elif path.endswith(".gif"):
    write_gif(path, frames)
  else:
    write_mp4(path, frames)


def keep_samples(mp4: bytes, keep: int) -> bytes:
  """A +faststart mp4 (one track) cut inside its media data after `keep` whole samples: the
  header still says how long the video is, the frames after the cut are gone."""
  i = mp4.index(b"stsz") + 4
  fixed, count = struct.unpack(">II", mp4[i + 4:i + 12])
  sizes = [fixed] * count if fixed else struct.unpack(f">{count}I", mp4[i + 12:i + 12 + 4 * count])
  data = mp4.index(b"mdat") + 4
  assert data > i, "not a +faststart mp4"
  return mp4[:data + sum(sizes[:keep]) + sizes[keep] // 2]


def pil_cover_crop(frames: np.ndarray, height: int, width: int, crop=(0.5, 0.5)) -> np.ndarray:
  """What decode should give, computed independently with PIL: each frame scaled (bicubic) to
  cover (height, width), then cropped at `crop` (x, y fractions of the slack)."""
  out = []
  for frame in frames:
    image = Image.fromarray(frame)
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    x, y = round((size[0] - width) * crop[0]), round((size[1] - height) * crop[1])
    out.append(np.asarray(image.crop((x, y, x + width, y + height))))
  return np.stack(out)


@dataclasses.dataclass
class Media:
  root: str
  manifest: str        # all.jsonl: every file above, good and damaged
  good: str            # good.jsonl: only the good ones
  bad_only: str        # bad.jsonl: only damaged entries
  rows: list           # the rows of all.jsonl (path relative to root)
  source: dict         # name -> uint8 [T, H, W, 3], the frames written (images: [1, H, W, 3])

  def path(self, name: str) -> str:
    return os.path.join(self.root, name)

  def caption(self, name: str) -> str:
    return next(r["caption"] for r in self.rows if r["path"] == name)


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def build(root) -> Media:
  root = str(root)
  source, rows = {}, []

  def add(name, frames=None, **extra):
    index = len(rows)
    if frames is not None:
      source[name] = frames
    rows.append({"path": name, "caption": f"clip {name} " + synthetic.make_scene(SEED, index).caption, **extra})

  for i, name in enumerate(SQUARE):
    frames = scene_frames(i, 16, 32, 32)
    write_video(os.path.join(root, name), frames)
    add(name, frames)
  for i, name in enumerate(WIDE):
    frames = scene_frames(10 + i, 16, 32, 48)
    write_video(os.path.join(root, name), frames)
    add(name, frames)
  frames = ramp_frames(RAMP, 32, 48)
  write_mp4(os.path.join(root, LONG), frames, fps=16)
  add(LONG, frames, start=0.5, end=2.5, fps=8)
  for i, (name, (h, w)) in enumerate(zip(IMAGES, [(40, 40), (36, 52), (24, 24)])):
    image = scene_frames(20 + i, 1, h, w)
    Image.fromarray(image[0]).save(os.path.join(root, name))
    add(name, image)

  open(os.path.join(root, "empty.mp4"), "wb").close()
  with open(os.path.join(root, "text.mp4"), "w") as f:
    f.write("this is a caption file, not a video\n" * 20)
  write_mp4(os.path.join(root, "broken.mp4"), scene_frames(30, 16, 32, 32))
  with open(os.path.join(root, "broken.mp4"), "rb") as f:
    data = f.read()
  with open(os.path.join(root, "broken.mp4"), "wb") as f:
    f.write(data[:len(data) // 2])
  write_mp4(os.path.join(root, "short.mp4"), scene_frames(31, 2, 32, 32))
  for name in STARTUP_BAD:
    add(name)
  write_mp4(os.path.join(root, "cut.mp4"), scene_frames(32, 48, 32, 32), faststart=True)
  with open(os.path.join(root, "cut.mp4"), "rb") as f:
    data = f.read()
  with open(os.path.join(root, "cut.mp4"), "wb") as f:
    f.write(keep_samples(data, 1))
  add("cut.mp4")

  bad = set(STARTUP_BAD + DECODE_BAD)
  media = Media(root, os.path.join(root, "all.jsonl"), os.path.join(root, "good.jsonl"),
                os.path.join(root, "bad.jsonl"), rows, source)
  _write_jsonl(media.manifest, rows)
  _write_jsonl(media.good, [r for r in rows if r["path"] not in bad])
  _write_jsonl(media.bad_only, [r for r in rows if r["path"] in bad])
  return media


_built = {}


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Media:
  """The dataset above, written once per test process (modules importing this fixture share it)."""
  if "media" not in _built:
    _built["media"] = build(tmp_path_factory.mktemp("media"))
  return _built["media"]


def files_config(manifest: str, *overrides: str):
  """The SMALL config reading `manifest` through data.source=files with the buckets above."""
  return config.load(TINY, SMALL + FILES + [f"--config.data.manifest={manifest}", *overrides])
