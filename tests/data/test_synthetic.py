"""Tests for jaxvid.data.synthetic, the moving-shapes dataset."""

import os
import pickle
import re
import subprocess
import sys

import grain
import numpy as np
import pytest

import jaxvid
from jaxvid.data import synthetic

CAPTION_RE = re.compile(
    r"a (\w+) (\w+) moving (\w+) on a (\w+) background")


def _noisy(video, std, rng):
  noisy = video.astype(np.float32) + rng.normal(0, std, video.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _shape_pixels(scene, video):
  """bool [T, H, W]: pixels painted in the scene's color."""
  return (video == np.array(synthetic.COLORS[scene.color], np.uint8)).all(-1)


def _combo(scene):
  return scene.color, scene.shape, scene.direction, scene.background


def test_palette_is_six_separated_hues():
  assert list(synthetic.COLORS) == [
      "red", "yellow", "green", "cyan", "blue", "magenta"]
  hues = [synthetic._hue(rgb) for rgb in synthetic.COLORS.values()]
  np.testing.assert_allclose(hues, [0, 60, 120, 180, 240, 300])
  assert synthetic.SHAPES == ("circle", "square", "triangle", "diamond")
  assert synthetic.DIRECTIONS == {
      "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
  assert len(synthetic.BACKGROUNDS) == 4


def test_make_scene_is_deterministic():
  for split in synthetic.SPLITS:
    for index in range(20):
      a = synthetic.make_scene(7, index, split)
      b = synthetic.make_scene(7, index, split)
      assert a == b
      np.testing.assert_array_equal(
          synthetic.render(a, 4, 32, 32), synthetic.render(b, 4, 32, 32))


def test_different_index_or_seed_gives_different_scene():
  scenes = [synthetic.make_scene(0, i) for i in range(50)]
  assert len(set(scenes)) == 50
  assert synthetic.make_scene(0, 3) != synthetic.make_scene(1, 3)
  videos = [synthetic.render(s, 4, 32, 32) for s in scenes[:10]]
  for i in range(1, 10):
    assert not np.array_equal(videos[0], videos[i])


@pytest.mark.parametrize("frames,height,width",
                         [(1, 32, 32), (8, 32, 32), (16, 64, 48), (3, 40, 72)])
def test_render_shape_and_dtype(frames, height, width):
  for index in range(8):
    video = synthetic.render(synthetic.make_scene(0, index), frames, height,
                             width)
    assert video.shape == (frames, height, width, 3)
    assert video.dtype == np.uint8


def test_caption_parses_back_to_scene():
  for index in range(100):
    scene = synthetic.make_scene(3, index, "all")
    match = CAPTION_RE.fullmatch(scene.caption)
    assert match, scene.caption
    assert match.groups() == _combo(scene)
  scene = synthetic.Scene("circle", "red", "left", "gray", 0.5, 0.5, 0.2, 0.4)
  assert scene.caption == "a red circle moving left on a gray background"


def test_scene_rejects_unknown_values():
  with pytest.raises(ValueError):
    synthetic.Scene("hexagon", "red", "left", "gray", 0.5, 0.5, 0.2, 0.4)
  with pytest.raises(ValueError):
    synthetic.Scene("circle", "purple", "left", "gray", 0.5, 0.5, 0.2, 0.4)
  with pytest.raises(ValueError):
    synthetic.make_scene(0, 0, "test")


def test_background_is_achromatic_and_shape_is_drawn():
  for index in range(100):
    scene = synthetic.make_scene(5, index, "all")
    video = synthetic.render(scene, 8, 32, 32)
    shape = _shape_pixels(scene, video)
    background = video[~shape]
    assert (background[:, 0] == background[:, 1]).all()
    assert (background[:, 1] == background[:, 2]).all()
    assert shape.sum((1, 2)).min() > 0.05 * 32 * 32


def test_backgrounds_are_distinct_and_two_are_textured():
  levels = {}
  for name in synthetic.BACKGROUNDS:
    bg = synthetic._background(name, 32, 32)
    assert bg.shape == (32, 32, 3) and bg.dtype == np.uint8
    levels[name] = bg[..., 0]
  textured = [n for n, lv in levels.items() if len(np.unique(lv)) > 1]
  assert len(textured) == 2
  flat = [lv.tobytes() for lv in levels.values()]
  assert len(set(flat)) == 4


@pytest.mark.parametrize("frames", [1, 2, 8, 64])
def test_shape_stays_inside_and_moves(frames):
  for index in range(60):
    scene = synthetic.make_scene(11, index, "all")
    assert 0.18 <= scene.size <= 0.28
    assert 0.35 <= scene.travel <= 0.55
    # Never touches the border, so is never cut off.
    for size in (32, 96):
      shape = _shape_pixels(scene, synthetic.render(scene, frames, size, size))
      assert not shape[:, [0, -1], :].any()
      assert not shape[:, :, [0, -1]].any()
    # At 96x96 aliasing is small, so a whole shape keeps its area.
    area = shape.sum((1, 2))
    assert area.min() >= 0.9 * area.max()
    if frames > 1:
      ys, xs = np.arange(96)[:, None], np.arange(96)[None, :]
      cx = (shape * xs).sum((1, 2)) / area / 96
      cy = (shape * ys).sum((1, 2)) / area / 96
      dx, dy = synthetic.DIRECTIONS[scene.direction]
      moved = (cx[-1] - cx[0]) * dx + (cy[-1] - cy[0]) * dy
      assert moved > 0.3
      assert abs((cx[-1] - cx[0]) * dy) + abs((cy[-1] - cy[0]) * dx) < 0.05


def test_render_follows_centers():
  scene = synthetic.Scene("square", "blue", "down", "black", 0.5, 0.3, 0.2, 0.4)
  np.testing.assert_allclose(
      scene.centers(5), [[0.5, 0.3], [0.5, 0.4], [0.5, 0.5], [0.5, 0.6],
                         [0.5, 0.7]])
  video = synthetic.render(scene, 5, 50, 50)
  shape = _shape_pixels(scene, video)
  rows = np.flatnonzero(shape[-1].any(1))
  # Half-side 0.2 * 50 = 10 px around y = 0.7 * 50 = 35: pixel rows 25..44.
  assert rows.min() == 25 and rows.max() == 44


def test_heldout_is_an_eighth_and_training_keeps_every_value():
  combos = [(c, s, d, b) for c in synthetic.COLORS for s in synthetic.SHAPES
            for d in synthetic.DIRECTIONS for b in synthetic.BACKGROUNDS]
  heldout = [c for c in combos if synthetic.is_heldout(*c)]
  train = [c for c in combos if not synthetic.is_heldout(*c)]
  assert len(combos) == 384
  assert 40 <= len(heldout) <= 56
  values = (synthetic.COLORS, synthetic.SHAPES, synthetic.DIRECTIONS,
            synthetic.BACKGROUNDS)
  for k, allowed in enumerate(values):
    assert {c[k] for c in train} == set(allowed)


def test_splits_never_mix():
  train = [synthetic.make_scene(0, i, "train") for i in range(2000)]
  heldout = [synthetic.make_scene(0, i, "heldout") for i in range(500)]
  assert not any(synthetic.is_heldout(*_combo(s)) for s in train)
  assert all(synthetic.is_heldout(*_combo(s)) for s in heldout)
  # Every attribute value actually shows up in training draws.
  assert {s.color for s in train} == set(synthetic.COLORS)
  assert {s.shape for s in train} == set(synthetic.SHAPES)
  assert {s.direction for s in train} == set(synthetic.DIRECTIONS)
  assert {s.background for s in train} == set(synthetic.BACKGROUNDS)
  mixed = [synthetic.is_heldout(*_combo(synthetic.make_scene(0, i, "all")))
           for i in range(1000)]
  assert 0 < sum(mixed) < 1000


def test_heldout_set_does_not_depend_on_python_hash_seed():
  code = ("from jaxvid.data import synthetic;"
          "print(sorted(synthetic._HELDOUT_SET))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxvid.__file__)))
  outputs = set()
  for hash_seed in ("0", "123"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=root)
    outputs.add(subprocess.run([sys.executable, "-c", code], env=env,
                               check=True, capture_output=True,
                               text=True).stdout)
  assert outputs == {str(sorted(synthetic._HELDOUT_SET)) + "\n"}


def test_heldout_scenes_cycle_through_every_heldout_combo():
  n_heldout = len(synthetic._HELDOUT_SET)
  scenes = synthetic.heldout_scenes(2 * n_heldout + 5, seed=0)
  first = [_combo(s) for s in scenes[:n_heldout]]
  assert set(first) == synthetic._HELDOUT_SET
  assert [_combo(s) for s in scenes[n_heldout:2 * n_heldout]] == first
  assert synthetic.heldout_scenes(10, seed=0) == scenes[:10]
  other = synthetic.heldout_scenes(10, seed=1)
  assert [_combo(s) for s in other] == first[:10]
  assert all(a.x != b.x for a, b in zip(other, scenes[:10]))


def test_detect_recovers_color_and_direction():
  rng = np.random.default_rng(0)
  clean_hits = noisy_hits = 0
  for index in range(200):
    scene = synthetic.make_scene(2, index, "all")
    video = synthetic.render(scene, 8, 32, 32)
    truth = (scene.color, scene.direction)
    clean_hits += synthetic.detect(video) == truth
    noisy_hits += synthetic.detect(_noisy(video, 20, rng)) == truth
  assert clean_hits == 200
  assert noisy_hits >= 190


def test_detect_handles_blur_and_non_square_frames():
  rng = np.random.default_rng(1)
  for index in range(50):
    scene = synthetic.make_scene(4, index, "all")
    video = synthetic.render(scene, 16, 48, 64).astype(np.float32)
    # Blend halfway toward gray and smear horizontally, then add noise.
    video = 0.5 * video + 64
    video = (video + np.roll(video, 1, 2) + np.roll(video, -1, 2)) / 3
    video = _noisy(video, 10, rng)
    assert synthetic.detect(video) == (scene.color, scene.direction)


def test_detect_without_foreground():
  rng = np.random.default_rng(2)
  for name in synthetic.BACKGROUNDS:
    still = np.repeat(synthetic._background(name, 32, 32)[None], 8, axis=0)
    assert synthetic.detect(still) == ("none", "none")
    assert synthetic.detect(_noisy(still, 20, rng)) == ("none", "none")
  # One frame shows where the shape is, not where it goes.
  scene = synthetic.make_scene(0, 0)
  assert synthetic.detect(synthetic.render(scene, 1, 32, 32)) == (
      scene.color, "none")
  # Frames without the shape are skipped.
  video = synthetic.render(scene, 8, 32, 32)
  video[2] = video[5] = synthetic._background(scene.background, 32, 32)
  assert synthetic.detect(video) == (scene.color, scene.direction)


def test_moving_shapes_source():
  source = synthetic.MovingShapes(seed=9, frames=8, height=32, width=48)
  assert len(source) == 2**31 - 1
  item = source[17]
  assert set(item) == {"video", "caption"}
  assert item["video"].shape == (8, 32, 48, 3)
  assert item["video"].dtype == np.uint8
  scene = synthetic.make_scene(9, 17)
  assert item["caption"] == scene.caption
  np.testing.assert_array_equal(item["video"],
                                synthetic.render(scene, 8, 32, 48))
  np.testing.assert_array_equal(source[np.int64(17)]["video"], item["video"])
  assert source[-1]["caption"] == synthetic.make_scene(9, 2**31 - 2).caption
  with pytest.raises(IndexError):
    source[2**31 - 1]


def test_moving_shapes_pickles_and_works_in_grain():
  source = synthetic.MovingShapes(seed=1, frames=4, height=32, width=32,
                                  split="heldout")
  clone = pickle.loads(pickle.dumps(source))
  for i in (0, 5, 123456):
    a, b = source[i], clone[i]
    assert a["caption"] == b["caption"]
    np.testing.assert_array_equal(a["video"], b["video"])
  dataset = grain.MapDataset.source(source)
  for i in (0, 3):
    item = dataset[i]
    assert item["caption"] == source[i]["caption"]
    np.testing.assert_array_equal(item["video"], source[i]["video"])
    match = CAPTION_RE.fullmatch(item["caption"])
    assert synthetic.is_heldout(match[1], match[2], match[3], match[4])
