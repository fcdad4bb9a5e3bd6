"""Tests for jaxvid.data.video_files: probing and decoding real mp4, webm, gif and png files."""

import dataclasses

import numpy as np
import pytest

from jaxvid.data import video_files
from jaxvid.data.manifest import Entry
from media import IMAGES, LONG, RAMP, SQUARE, WIDE, media, pil_cover_crop, ramp_frames, write_mp4  # noqa: F401

# The codecs are lossy and ffmpeg's bicubic scaler is not PIL's: a decoded clip is "the same"
# as the source resized by PIL when their mean absolute difference is below this (the gray
# levels are 0..255; a crop one third off, or another clip, differs by 10 or more).
SAME = 7.0


def _entry(media, name, **kw):
  return Entry(media.path(name), media.caption(name), **kw)


def _mad(a, b):
  return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("name,meta", [
    ("sq0.mp4", (32, 32, 2.0, 8.0)),
    ("sq3.webm", (32, 32, 2.0, 8.0)),
    ("sq4.gif", (32, 32, 1.92, 8.33)),      # gif delays are in 1/100 s: 125 ms is stored as 120 ms
    ("wd0.mp4", (48, 32, 2.0, 8.0)),
    (LONG, (48, 32, 3.0, 16.0)),
    ("im0.png", (40, 40, 0.0, 0.0)),
    ("im1.png", (52, 36, 0.0, 0.0)),
])
def test_probe(media, name, meta):
  m = video_files.probe(_entry(media, name))
  assert (m.width, m.height) == meta[:2]
  assert m.duration == pytest.approx(meta[2], abs=0.01) and m.fps == pytest.approx(meta[3], abs=0.01)


@pytest.mark.parametrize("name,shape", [
    ("sq0.mp4", (4, 16, 16)), ("sq3.webm", (4, 16, 16)), ("sq4.gif", (4, 16, 16)),
    ("wd0.mp4", (4, 16, 24)), ("wd2.webm", (4, 16, 24)), ("sq1.mp4", (8, 16, 24)),
    ("wd1.mp4", (2, 24, 16)), ("im0.png", (1, 16, 16)), ("im1.png", (1, 16, 24)), ("im2.png", (1, 32, 32)),
])
def test_decode_gives_the_bucket_shape_and_the_source_content(media, name, shape):
  entry = _entry(media, name)
  meta = video_files.probe(entry)
  rate = video_files.sample_fps(entry, meta, 0.0, 1)
  video = video_files.decode(entry, meta, *shape, rate, offset=0.0)
  assert video.shape == (*shape, 3) and video.dtype == np.uint8
  want = pil_cover_crop(media.source[name][:shape[0]], *shape[1:])
  assert _mad(video, want) < SAME, name
  # ... and not just any clip of this dataset: another one differs clearly.
  other = media.source[SQUARE[1] if name != SQUARE[1] else SQUARE[0]][:shape[0]]
  assert _mad(video, pil_cover_crop(other, *shape[1:])) > 2 * SAME


def test_frame_rate_sampling_covers_more_time_at_a_lower_rate(media):
  # LONG: 48 frames at 16 fps, frame i a flat gray of RAMP[i] (brightness = frame index).
  entry = _entry(media, LONG)
  meta = video_files.probe(entry)
  native = video_files.decode(entry, meta, 16, 16, 16, 16.0, offset=0.0)
  half = video_files.decode(entry, meta, 16, 16, 16, 8.0, offset=0.0)
  level = lambda v: v.reshape(len(v), -1).mean(1)
  np.testing.assert_allclose(level(native), RAMP[:16], atol=3)       # frames 0..15: the first second
  np.testing.assert_allclose(level(half), RAMP[:32:2], atol=3)       # frames 0, 2, .., 30: two seconds
  np.testing.assert_array_equal(half[:8], native[::2])               # the same frames as a stride of 2
  # The whole window at 8 fps: 24 frames; more than it holds is a BadFile (too short).
  assert video_files.available_frames(entry, meta, 8.0) == 24
  np.testing.assert_allclose(level(video_files.decode(entry, meta, 24, 8, 8, 8.0)), RAMP[::2], atol=3)
  with pytest.raises(video_files.BadFile, match="too short: 24 frames at 8 fps, 25 needed"):
    video_files.decode(entry, meta, 25, 8, 8, 8.0)


def test_window_offset_and_entry_fps(media):
  # The manifest's window of LONG: 0.5 s .. 2.5 s at 8 fps = 16 frames, source frames 8, 10, .., 38.
  row = next(r for r in media.rows if r["path"] == LONG)
  entry = _entry(media, LONG, start=row["start"], end=row["end"], fps=row["fps"])
  meta = video_files.probe(entry)
  rate = video_files.sample_fps(entry, meta, 4.0, 3)        # the entry's fps wins over data.fps
  assert rate == 8.0 and video_files.available_frames(entry, meta, rate) == 16
  level = lambda v: v.reshape(len(v), -1).mean(1)
  for offset, first in ((0.0, 8), (0.5, 20), (1.0, 32)):   # slack of 12 frames at 8 fps = 24 source frames
    video = video_files.decode(entry, meta, 4, 16, 16, rate, offset=offset)
    np.testing.assert_allclose(level(video), RAMP[first:first + 8:2], atol=3, err_msg=f"offset {offset}")


def test_sample_fps_and_available_frames():
  video, image = Entry("/x/a.mp4", ""), Entry("/x/a.png", "")
  meta = video_files.Meta(64, 48, 10.0, 30.0)
  assert video_files.sample_fps(video, meta, 0.0, 1) == 30.0
  assert video_files.sample_fps(video, meta, 0.0, 3) == 10.0
  assert video_files.sample_fps(video, meta, 12.0, 3) == 12.0
  assert video_files.sample_fps(dataclasses.replace(video, fps=5.0), meta, 12.0, 3) == 5.0
  assert video_files.available_frames(video, meta, 8.0) == 80
  assert video_files.available_frames(dataclasses.replace(video, start=2.0, end=4.5), meta, 8.0) == 20
  assert video_files.available_frames(dataclasses.replace(video, start=9.0, end=20.0), meta, 8.0) == 8
  assert video_files.available_frames(dataclasses.replace(video, start=12.0), meta, 8.0) == 0
  assert video_files.available_frames(image, video_files.Meta(64, 48), 8.0) == 1


def test_center_crop_and_off_center_crops(media):
  # A 32x48 (wide) clip into 16x16: scaled to 16x24, 8 columns of slack to crop from.
  name = WIDE[0]
  entry = _entry(media, name)
  meta = video_files.probe(entry)
  source = media.source[name][:4]
  crops = [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5)]
  videos = [video_files.decode(entry, meta, 4, 16, 16, 8.0, offset=0.0, crop=c) for c in crops]
  np.testing.assert_array_equal(videos[1], video_files.decode(entry, meta, 4, 16, 16, 8.0, offset=0.0))
  for i, video in enumerate(videos):
    diffs = [_mad(video, pil_cover_crop(source, 16, 16, c)) for c in crops]
    assert diffs[i] < SAME and min(d for k, d in enumerate(diffs) if k != i) > 2 * SAME, (crops[i], diffs)
  # A tall image into a wide crop: the slack is vertical.
  image = _entry(media, "im0.png")            # 40x40
  top, bottom = (video_files.decode(image, video_files.probe(image), 1, 8, 16, 0.0, crop=(0.5, y)) for y in (0, 1))
  np.testing.assert_array_equal(top[0], pil_cover_crop(media.source["im0.png"], 8, 16, (0.5, 0.0))[0])
  np.testing.assert_array_equal(bottom[0], pil_cover_crop(media.source["im0.png"], 8, 16, (0.5, 1.0))[0])
  assert not np.array_equal(top, bottom)


def test_random_offsets_pick_different_start_frames(media):
  entry = _entry(media, LONG)
  meta = video_files.probe(entry)
  starts = set()
  for offset in np.random.default_rng(0).random(6):
    video = video_files.decode(entry, meta, 4, 8, 8, 16.0, offset=float(offset))
    first = int(np.argmin(np.abs(RAMP - video[0].mean())))
    assert abs(first - offset * 44) < 1                  # 48 - 4 frames of slack at 16 fps
    np.testing.assert_allclose(video.reshape(4, -1).mean(1), RAMP[first:first + 4], atol=3)
    starts.add(first)
  assert len(starts) == 6


@pytest.mark.parametrize("name,words", [
    ("missing.mp4", "file not found"), ("empty.mp4", "empty file"), ("text.mp4", "not a readable video"),
    ("broken.mp4", "not a readable video"),
])
def test_bad_files_fail_the_probe(media, name, words):
  with pytest.raises(video_files.BadFile, match=words):
    video_files.probe(_entry(media, name))


def test_a_truncated_faststart_mp4_probes_but_fails_to_decode(media):
  entry = _entry(media, "cut.mp4")
  meta = video_files.probe(entry)         # the header (first) says 6 s at 8 fps ...
  assert (meta.width, meta.height, meta.duration, meta.fps) == (32, 32, 6.0, 8.0)
  for offset in (0.0, 0.5, 1.0):          # ... the frames are gone
    with pytest.raises(video_files.BadFile, match=r"truncated or unreadable: [0-3] of 4 frames decoded"):
      video_files.decode(entry, meta, 4, 16, 16, 8.0, offset=offset)


def test_too_short_and_wrong_image_length_are_bad_files(media):
  entry = _entry(media, "short.mp4")
  meta = video_files.probe(entry)
  assert video_files.available_frames(entry, meta, 8.0) == 2
  with pytest.raises(video_files.BadFile, match="too short: 2 frames at 8 fps, 4 needed"):
    video_files.decode(entry, meta, 4, 16, 16, 8.0)
  image = _entry(media, IMAGES[0])
  with pytest.raises(video_files.BadFile, match="an image is one frame, 4 were asked for"):
    video_files.decode(image, video_files.probe(image), 4, 16, 16, 8.0)


def test_a_file_removed_after_probing_is_a_bad_file(tmp_path):
  path = tmp_path / "a.mp4"
  write_mp4(path, ramp_frames(RAMP[:16], 16, 16))
  entry = Entry(str(path), "x")
  meta = video_files.probe(entry)
  assert video_files.decode(entry, meta, 4, 16, 16, 8.0).shape == (4, 16, 16, 3)
  path.write_bytes(b"")
  with pytest.raises(video_files.BadFile, match="empty file"):
    video_files.decode(entry, meta, 4, 16, 16, 8.0)
  path.unlink()
  with pytest.raises(video_files.BadFile, match="file not found"):
    video_files.decode(entry, meta, 4, 16, 16, 8.0)


def test_manifest_sizes_skip_the_probe(media):
  # width, height and duration from the manifest: probe reads nothing (the file may even be gone).
  entry = Entry(media.path("missing.mp4"), "x", width=640, height=360, duration=12.5)
  assert video_files.probe(entry) == video_files.Meta(640, 360, 12.5, 0.0)
  image = Entry(media.path("missing.png"), "x", width=20, height=10)
  assert video_files.probe(image) == video_files.Meta(20, 10, 0.0, 0.0)
  # Only width and height: a video must still be probed for its length.
  with pytest.raises(video_files.BadFile, match="file not found"):
    video_files.probe(Entry(media.path("missing.mp4"), "x", width=640, height=360))


def test_ffmpeg_starts_without_python_in_the_forked_child():
  # imageio-ffmpeg's default preexec_fn runs Python between fork and exec, which deadlocked the
  # child in a multithreaded process (a training run that never exited); jaxvid turns it off.
  import imageio_ffmpeg._utils
  assert imageio_ffmpeg._utils._popen_kwargs(prevent_sigint=True)["preexec_fn"] is None


def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped(tmp_path):
  from PIL import Image
  gray = np.full((12, 20), 30000, np.uint16)      # 46% gray
  gray[:, 10:] = 65535
  Image.fromarray(gray).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode.startswith("I")
  out = video_files.decode_image(str(tmp_path / "g16.png"), 12, 20)
  assert out.shape == (12, 20, 3)
  assert abs(int(out[:, :8].mean()) - round(30000 / 257)) <= 1 and out[:, 12:].min() == 255
