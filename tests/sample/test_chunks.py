"""Chunks: how many an item takes, what each is given, how they add up; the plan of lanes."""

import itertools

import numpy as np
from PIL import Image
import pytest

from conftest import SMALL, TINY
from jaxvid import config
from jaxvid.sample import chunks, writer
from jaxvid.sample.items import Item
from jaxvid.sample.job import plan_lanes


@pytest.fixture(scope="module")
def cfg():
  return config.load(TINY, SMALL + ["--config.video.frames=8"])    # T = 8, K = 4, 16x16


def _item(mode="text-to-video", frames=8, given=0, **kw):
  return Item("x", "p", 1, "", mode, frames=frames, given=given, **kw)


@pytest.mark.parametrize("mode, frames, given, context, count", [
    ("text-to-video", 8, 0, 4, 1), ("text-to-video", 5, 0, 4, 1), ("text-to-video", 9, 0, 4, 2),
    ("text-to-video", 24, 0, 4, 5), ("text-to-video", 24, 0, 6, 9),
    ("image-to-video", 8, 1, 4, 1), ("image-to-video", 9, 1, 4, 2),
    ("extend", 12, 8, 4, 1), ("extend", 13, 8, 4, 2), ("extend", 5, 2, 4, 1), ("extend", 9, 2, 4, 2),
    ("inpaint", 8, 8, 4, 1), ("restyle", 8, 8, 4, 1), ("text-to-video", 9999, 0, 4, 2499),
])
def test_chunk_count(mode, frames, given, context, count):
  assert chunks.chunk_count(_item(mode, frames, given), 8, context) == count


def _run(work, make):
  """Runs every chunk of `work` with make(known, mask, strength) -> frames; returns the inputs."""
  seen = []
  for c in range(work.chunks):
    known, mask, strength = work.inputs(c)
    seen.append((known.copy(), mask.copy(), strength))
    work.add(c, make(c, known, mask))
  assert work.finished
  return seen


def _numbered(c, known, mask):
  """A fake model: keeps the known frames, fills the others with the chunk number + 100."""
  out = np.where(mask > 0, known, np.uint8(100 + c))
  return out.astype(np.uint8)


def test_long_text_to_video_continues_from_the_last_frames(cfg):
  work = chunks.Work(_item(frames=20), cfg)                 # 8 + 4 + 4 + 4 new frames
  seen = _run(work, _numbered)
  assert work.chunks == 4 and not seen[0][1].any()
  for c in range(1, 4):
    known, mask, _ = seen[c]
    assert mask[:4].all() and not mask[4:].any()           # the first K = 4 frames are given ...
    prev = 100 + c - 1
    assert (known[:4] == prev).all()                        # ... and they are the last 4 made
  frames = work.video[:, 0, 0, 0]
  assert list(frames) == [100] * 8 + [101] * 4 + [102] * 4 + [103] * 4


def test_image_to_video_and_extend_start_from_the_given_frames(cfg, tmp_path):
  Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "still.png")
  work = chunks.Work(_item("image-to-video", frames=12, given=1, image=str(tmp_path / "still.png")), cfg)
  seen = _run(work, _numbered)
  assert seen[0][1][:, 0, 0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]     # the image is frame 0, alone
  assert (seen[0][0][0] == 7).all()
  assert work.video[:, 0, 0, 0].tolist() == [7] + [100] * 7 + [101] * 4

  clip = np.arange(6, dtype=np.uint8)[:, None, None, None] * np.ones((1, 16, 16, 3), np.uint8)
  writer.write_mp4(tmp_path / "clip.mp4", np.repeat(clip * 40, 1, 0), fps=8)
  work = chunks.Work(_item("extend", frames=11, given=6, video=str(tmp_path / "clip.mp4")), cfg)
  seen = _run(work, _numbered)
  assert work.chunks == 2 and seen[0][1][:, 0, 0, 0].tolist() == [1] * 4 + [0] * 4
  decoded = writer.read_mp4(tmp_path / "clip.mp4")
  np.testing.assert_array_equal(work.video[:6], decoded)                     # the clip as read, first
  assert work.video[6:, 0, 0, 0].tolist() == [100] * 4 + [101]
  np.testing.assert_array_equal(seen[0][0][:4], decoded[2:6])               # its last 4 frames given


def test_inpaint_and_restyle_inputs(cfg, tmp_path):
  clip = np.full((8, 32, 32, 3), 60, np.uint8)
  writer.write_mp4(tmp_path / "clip.mp4", clip, fps=8)
  # A mask the video's size (32x32): its right half, scaled with the video to 16x16.
  Image.fromarray(((np.arange(32) >= 16)[None].repeat(32, 0) * 255).astype(np.uint8)).save(tmp_path / "m.png")
  work = chunks.Work(_item("inpaint", given=8, video=str(tmp_path / "clip.mp4"), mask_image=str(tmp_path / "m.png")),
                     cfg)
  [(known, mask, strength)] = _run(work, _numbered)
  assert strength == 1.0 and known.shape == (8, 16, 16, 3) and abs(int(known.mean()) - 60) <= 2
  assert mask[..., :8, 0].all() and not mask[..., 8:, 0].any()             # known: the left half
  # The same mask as a 16-bit PNG, its left half at 30000 (117 in 8 bits, dark: kept), not clipped to white.
  Image.fromarray(np.where((np.arange(32) >= 16)[None].repeat(32, 0), 65535, 30000).astype(np.uint16)).save(
      tmp_path / "m16.png")
  m16 = _item("inpaint", given=8, video=str(tmp_path / "clip.mp4"), mask_image=str(tmp_path / "m16.png"))
  m16_region = chunks.region(m16, (8, 16, 16))      # (column 7 blends both halves when scaled to 16)
  assert not m16_region[..., :7].any() and m16_region[..., 8:].all()
  box = _item("inpaint", given=8, video=str(tmp_path / "clip.mp4"), boxes=((2, 4, 6, 10, 1, 3),))
  region = chunks.region(box, (8, 16, 16))
  assert region.sum() == 2 * 6 * 4 and region[1:3, 4:10, 2:6].all()

  work = chunks.Work(_item("restyle", given=8, video=str(tmp_path / "clip.mp4"), strength=0.3), cfg)
  [(known, mask, strength)] = _run(work, _numbered)
  assert strength == 0.3 and not mask.any() and abs(int(known.mean()) - 60) <= 2


@pytest.mark.parametrize("counts, lanes", [([1] * 7, 3), ([1, 5, 2, 1, 1, 3], 2), ([4, 4, 4], 4), ([2], 1)])
def test_lanes_run_each_chunk_once_in_order_on_one_lane(counts, lanes):
  rounds = plan_lanes(counts, lanes)
  assert all(len(r) == lanes for r in rounds)
  where = {}
  for r, lane in itertools.product(range(len(rounds)), range(lanes)):
    if rounds[r][lane] is not None:
      i, c = rounds[r][lane]
      assert (i, c) not in where
      where[(i, c)] = (r, lane)
  assert set(where) == {(i, c) for i, n in enumerate(counts) for c in range(n)}
  for i, n in enumerate(counts):
    for c in range(1, n):                                    # the next chunk: same lane, next round
      assert where[(i, c)] == (where[(i, c - 1)][0] + 1, where[(i, c - 1)][1])
  assert len(rounds) <= max(max(counts), -(-sum(counts) // lanes) + max(counts) - 1)


def test_one_chunk_items_fill_rounds_in_order():
  assert plan_lanes([1] * 5, 2) == [[(0, 0), (1, 0)], [(2, 0), (3, 0)], [(4, 0), None]]


def test_through_a_vae_context_is_whole_latent_frames(tmp_path):
  vcfg = config.load(f"{TINY}:latent")                      # T = 9 pixel frames, tc = 4: 3 latent frames
  assert chunks.context_frames(vcfg) == 5                   # 1 + 4: the first two latent frames
  config.validate(config.load(f"{TINY}:latent", ["--config.sample.context_frames=5"]), 1)
  with pytest.raises(config.UserError, match=r"must be 1 \+ 4 k"):
    config.validate(config.load(f"{TINY}:latent", ["--config.sample.context_frames=4"]), 1)
  # A 3-frame clip is shorter than the context: only its last whole latent frame (its last
  # frame) is given, so the new frames follow it at a latent boundary.
  clip = np.arange(3, dtype=np.uint8)[:, None, None, None] * np.full((1, 32, 32, 3), 60, np.uint8)
  writer.write_mp4(tmp_path / "clip.mp4", clip, fps=8)
  work = chunks.Work(_item("extend", frames=13, given=3, video=str(tmp_path / "clip.mp4")), vcfg)
  seen = _run(work, _numbered)
  decoded = writer.read_mp4(tmp_path / "clip.mp4")
  assert work.chunks == 2 and seen[0][1][:, 0, 0, 0].tolist() == [1] + [0] * 8
  np.testing.assert_array_equal(seen[0][0][0], decoded[2])
  assert seen[1][1][:, 0, 0, 0].tolist() == [1] * 5 + [0] * 4
  np.testing.assert_array_equal(work.video[:3], decoded)
  assert work.video[3:, 0, 0, 0].tolist() == [100] * 8 + [101] * 2
