"""Tests for jaxvid.sample.writer: mp4 round trips and the output folder."""

import json
import os

import imageio_ffmpeg
import numpy as np
import pytest

from jaxvid.sample import writer


def _pattern(t, h, w):
  """Returns a smooth, moving uint8 [T, H, W, 3] test pattern."""
  ts, ys, xs = np.meshgrid(
      np.arange(t), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  r = 128 + 90 * np.sin(2 * np.pi * (xs + 0.05 * ts))
  g = 128 + 90 * np.cos(2 * np.pi * (ys - 0.05 * ts))
  b = 40 + 150 * (xs + ys) / 2
  return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def _meta(path):
  """Returns imageio-ffmpeg's metadata dict of a video file."""
  frames = imageio_ffmpeg.read_frames(str(path))
  try:
    return next(frames)
  finally:
    frames.close()


@pytest.mark.parametrize("shape", [(8, 32, 32), (1, 32, 32), (16, 64, 48)])
def test_mp4_round_trip(tmp_path, shape):
  frames = _pattern(*shape)
  path = tmp_path / "v.mp4"
  writer.write_mp4(path, frames, fps=8)

  decoded = writer.read_mp4(path)
  assert decoded.dtype == np.uint8
  assert decoded.shape == frames.shape
  error = np.abs(decoded.astype(np.float64) - frames).mean()
  assert error < 10, error

  meta = _meta(path)
  assert meta["codec"] == "h264"
  assert meta["pix_fmt"].split("(")[0] == "yuv420p"
  assert meta["size"] == (shape[2], shape[1])  # (W, H)
  assert meta["fps"] == 8

  data = path.read_bytes()  # +faststart: the index (moov) precedes the data.
  assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_mp4_is_quiet(tmp_path, capfd):
  writer.write_mp4(tmp_path / "v.mp4", _pattern(4, 32, 32), fps=8)
  writer.read_mp4(tmp_path / "v.mp4")
  out, err = capfd.readouterr()
  assert out == "" and err == ""


@pytest.mark.parametrize("shape", [(4, 31, 32), (4, 32, 33), (4, 33, 33)])
def test_mp4_odd_size_raises(tmp_path, shape):
  with pytest.raises(ValueError, match="even"):
    writer.write_mp4(tmp_path / "v.mp4", np.zeros(shape + (3,), np.uint8), 8)
  assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("frames", [
    np.zeros((4, 32, 32, 3), np.float32),  # Wrong dtype.
    np.zeros((32, 32, 3), np.uint8),  # No time axis.
    np.zeros((4, 32, 32, 4), np.uint8),  # RGBA.
    np.zeros((0, 32, 32, 3), np.uint8),  # No frames.
])
def test_mp4_bad_frames_raise(tmp_path, frames):
  with pytest.raises(ValueError):
    writer.write_mp4(tmp_path / "v.mp4", frames, 8)


@pytest.mark.parametrize("raw, expected", [
    ("cat_001", "cat_001"),
    ("a b/c", "a_b_c"),
    ("../../x", "x"),
    ("..\\..\\x", "x"),
    ("/etc/passwd", "etc_passwd"),
    (".hidden", "hidden"),
    ("_-ok.v2", "-ok.v2"),
    ("café 猫", "caf___"),
    ("x" * 150, "x" * 100),
])
def test_sanitize_id(raw, expected):
  assert writer.sanitize_id(raw) == expected
  assert writer.sanitize_id(expected) == expected  # Idempotent.


@pytest.mark.parametrize("raw", ["", "..", ".", "___", "猫猫", "/"])
def test_sanitize_id_empty_raises(raw):
  with pytest.raises(ValueError):
    writer.sanitize_id(raw)


def test_sanitize_id_is_deterministic_and_contained(tmp_path):
  for raw in ["../../x", "a/../../b", "../" * 60 + "evil", "\x00\n\t"]:
    try:
      stem = writer.sanitize_id(raw)
    except ValueError:
      continue
    assert stem == writer.sanitize_id(raw)
    assert len(stem) <= 100
    target = os.path.realpath(tmp_path / f"{stem}.mp4")
    assert os.path.dirname(target) == os.path.realpath(tmp_path)


def _record(prompt, seed):
  return {"prompt": prompt, "seed": np.int64(seed), "sampler": "euler",
          "steps": 4, "guidance": 1.5, "mode": "t2v"}


def test_output_folder(tmp_path):
  root = tmp_path / "out" / "nested"
  folder = writer.OutputFolder(root, title="Run <1>")
  assert folder.done_ids() == set()
  prompts = {"a": "a red ball", "b": '<script>alert(1)</script> & "q"'}
  for i, (item_id, prompt) in enumerate(prompts.items()):
    folder.write_item(item_id, _pattern(4, 32, 32), 8, _record(prompt, i))
  folder.write_gallery()

  assert folder.done_ids() == {"a", "b"}
  assert sorted(os.listdir(root)) == [
      "a.json", "a.mp4", "b.json", "b.mp4", "index.html", "manifest.jsonl"]

  lines = (root / "manifest.jsonl").read_text().splitlines()
  entries = [json.loads(line) for line in lines]
  assert [e["id"] for e in entries] == ["a", "b"]
  assert entries[1] == {"id": "b", "video": "b.mp4", "prompt": prompts["b"],
                        "seed": 1, "sampler": "euler", "steps": 4,
                        "guidance": 1.5, "mode": "t2v"}
  assert json.loads((root / "b.json").read_text()) == entries[1]
  assert writer.read_mp4(root / "a.mp4").shape == (4, 32, 32, 3)

  page = (root / "index.html").read_text()
  assert "<script>" not in page
  assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;" in page
  assert "Run &lt;1&gt;" in page
  assert page.count("<video ") == 2
  for item_id in prompts:
    assert f'src="{item_id}.mp4"' in page
    assert f'href="{item_id}.json"' in page
  for attr in ["autoplay", "loop", "muted"]:
    assert attr in page
  assert "image-rendering: pixelated" in page


def test_resume_and_truncated_manifest(tmp_path):
  folder = writer.OutputFolder(tmp_path)
  folder.write_item("a", _pattern(2, 32, 32), 8, _record("first", 0))
  with open(tmp_path / "manifest.jsonl", "a") as f:
    f.write('{"id": "cut", "prompt": "kil')  # A job killed mid-line.

  resumed = writer.OutputFolder(tmp_path)
  assert resumed.done_ids() == {"a"}
  resumed.write_item("b", _pattern(2, 32, 32), 8, _record("second", 1))
  assert writer.OutputFolder(tmp_path).done_ids() == {"a", "b"}
  resumed.write_gallery()
  page = (tmp_path / "index.html").read_text()
  assert "first" in page and "second" in page and "kil" not in page
  assert page.index("first") < page.index("second")


def test_temp_files_left_by_a_killed_job_are_removed(tmp_path):
  folder = writer.OutputFolder(tmp_path)
  (tmp_path / ".b.tmp-0123456789ab.mp4").write_bytes(b"half a video")
  (tmp_path / ".b.tmp-0123456789ab.json").write_bytes(b"{")
  others = [".bb.tmp-0123456789ab.mp4", ".b.tmp-x.tmp-0123456789ab.mp4"]   # ids "bb" and "b.tmp-x"
  for name in others:
    (tmp_path / name).write_bytes(b"another item's")
  folder.write_item("b", _pattern(2, 32, 32), 8, _record("b", 0))
  assert sorted(f.name for f in tmp_path.iterdir() if ".tmp-" in f.name) == sorted(others)   # only b's own
  assert writer.read_mp4(tmp_path / "b.mp4").shape[0] == 2


def test_rewritten_item_listed_once(tmp_path):
  folder = writer.OutputFolder(tmp_path)
  folder.write_item("a", _pattern(2, 32, 32), 8, _record("old", 0))
  folder.write_item("a", _pattern(2, 32, 32), 8, _record("new", 0))
  folder.write_gallery()
  page = (tmp_path / "index.html").read_text()
  assert page.count("<video ") == 1
  assert "new" in page and "old" not in page


def test_write_item_rejects_bad_input(tmp_path):
  folder = writer.OutputFolder(tmp_path)
  frames = _pattern(2, 32, 32)
  for bad_id in ["../x", "a b", "", ".a"]:
    with pytest.raises(ValueError):
      folder.write_item(bad_id, frames, 8, _record("p", 0))
  with pytest.raises(ValueError):
    folder.write_item("a", frames, 8, {"seed": 0})  # No prompt.
  with pytest.raises(ValueError):
    folder.write_item("a", frames, 8, {"prompt": "p", "id": "other"})
  with pytest.raises(ValueError):
    folder.write_item("a", frames[:, :31], 8, _record("p", 0))  # Odd width.
  assert os.listdir(tmp_path) == ["manifest.jsonl"]  # No temp files; the manifest is empty.
  assert folder.done_ids() == set() and (tmp_path / "manifest.jsonl").read_bytes() == b""


def test_a_folder_of_other_files_is_refused(tmp_path):
  from jaxvid.errors import UserError
  (tmp_path / "clip.mp4").write_bytes(b"mine")
  with pytest.raises(UserError, match="holds files .clip.mp4, .... and no manifest.jsonl, so it is not a sample folder"):
    writer.OutputFolder(tmp_path)
  assert os.listdir(tmp_path) == ["clip.mp4"] and (tmp_path / "clip.mp4").read_bytes() == b"mine"
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="exists and is not a folder"):
    writer.OutputFolder(tmp_path / "file")
  with pytest.raises(UserError, match="file is a file, not a folder; choose another --output"):
    writer.OutputFolder(tmp_path / "file" / "sub" / "out")
  # A folder with someone else's manifest.jsonl (a training manifest, say) is not a sample folder.
  data = tmp_path / "data"
  data.mkdir()
  (data / "manifest.jsonl").write_text('{"path": "c1.mp4", "caption": "a cat"}\n')
  (data / "index.html").write_text("mine")
  with pytest.raises(UserError, match="holds a manifest.jsonl whose line 1 is not a jaxvid sample record"):
    writer.OutputFolder(data)
  assert (data / "manifest.jsonl").read_text() == '{"path": "c1.mp4", "caption": "a cat"}\n'
  assert sorted(os.listdir(data)) == ["index.html", "manifest.jsonl"]


def test_files_are_readable_by_others(tmp_path):
  old_umask = os.umask(0o022)
  try:
    folder = writer.OutputFolder(tmp_path)
    folder.write_item("a", _pattern(2, 32, 32), 8, _record("p", 0))
    folder.write_gallery()
  finally:
    os.umask(old_umask)
  for name in ["a.mp4", "a.json", "index.html", "manifest.jsonl"]:
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
