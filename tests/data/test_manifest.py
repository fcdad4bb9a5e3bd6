"""Tests for jaxvid.data.manifest: JSONL, CSV and folder manifests, and the user's errors."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from jaxvid.data import manifest
from jaxvid.data.manifest import Entry
from jaxvid.errors import UserError
from media import scene_frames, write_mp4, write_webm


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_jsonl_relative_paths_windows_and_fps(tmp_path):
  sub = tmp_path / "lists"
  sub.mkdir()
  path = _jsonl(sub / "m.jsonl", [
      {"path": "a.mp4", "caption": "a red circle"},
      {"path": "../clips/b.webm", "caption": "a blue square", "start": 1.5, "end": "4", "fps": 12},
      {"path": "/abs/c.png", "caption": None, "width": 640, "height": "480"},
      "",     # blank lines are allowed
      {"path": "d.mp4", "caption": "x", "start": "", "end": None, "duration": 7.25, "extra": "kept out"},
  ])
  entries = manifest.read(path)
  assert entries == [
      Entry(str(sub / "a.mp4"), "a red circle"),
      Entry(str(tmp_path / "clips" / "b.webm"), "a blue square", start=1.5, end=4.0, fps=12.0),
      Entry("/abs/c.png", "", width=640, height=480),
      Entry(str(sub / "d.mp4"), "x", duration=7.25),
  ]
  assert [e.is_image for e in entries] == [False, False, True, False]
  assert entries[0].key == str(sub / "a.mp4")
  assert entries[1].key == str(tmp_path / "clips" / "b.webm") + "[1.5:4]"
  assert isinstance(entries[2].width, int) and isinstance(entries[1].end, float)


def test_csv_relative_paths_optional_columns(tmp_path):
  (tmp_path / "m.csv").write_text(
      "caption, path ,start,end,fps\n"              # any column order; spaces around names
      '"a cat, jumping",cat.mp4,,,\n'
      "a dog,videos/dog.webm,2,5.5,24\n"
      "an image,img/x.JPG,,,\n")
  entries = manifest.read(str(tmp_path / "m.csv"))
  assert entries == [
      Entry(str(tmp_path / "cat.mp4"), "a cat, jumping"),
      Entry(str(tmp_path / "videos" / "dog.webm"), "a dog", start=2.0, end=5.5, fps=24.0),
      Entry(str(tmp_path / "img" / "x.JPG"), "an image"),
  ]
  assert [e.is_image for e in entries] == [False, False, True]


def test_csv_and_jsonl_describe_the_same_entries(tmp_path):
  rows = [{"path": "x/a.mp4", "caption": "one", "start": 1.0, "end": 3.0, "fps": 8.0},
          {"path": "b.gif", "caption": "two"}]
  _jsonl(tmp_path / "m.jsonl", rows)
  (tmp_path / "m.csv").write_text("path,caption,start,end,fps\nx/a.mp4,one,1,3,8\nb.gif,two,,,\n")
  assert manifest.read(str(tmp_path / "m.jsonl")) == manifest.read(str(tmp_path / "m.csv"))


def test_folder_of_videos_with_txt_captions(tmp_path):
  root = tmp_path / "clips"
  (root / "sub").mkdir(parents=True)
  write_mp4(root / "cat.mp4", scene_frames(0, 4, 16, 16))
  (root / "cat.txt").write_text("  a cat\n jumping  \n")
  write_webm(root / "sub" / "dog.webm", scene_frames(1, 4, 16, 16))
  (root / "sub" / "dog.txt").write_text("a dog")
  Image.fromarray(scene_frames(2, 1, 16, 16)[0]).save(root / "sub" / "still.png")
  (root / "sub" / "still.txt").write_text("a still image")
  write_mp4(root / "nocaption.mp4", scene_frames(3, 4, 16, 16))   # no .txt: not used
  (root / "notes.txt").write_text("a caption without a video")     # no video: not an entry
  (root / "data.json").write_text("{}")                            # not a video or image
  entries = manifest.read(str(root))
  assert entries == [
      Entry(str(root / "cat.mp4"), "a cat jumping"),
      Entry(str(root / "sub" / "dog.webm"), "a dog"),
      Entry(str(root / "sub" / "still.png"), "a still image"),
  ]
  assert [e.is_image for e in entries] == [False, False, True]


def test_images_are_entries_of_every_format(tmp_path):
  names = ["a.png", "b.jpg", "c.JPEG", "d.webp", "e.bmp", "f.mp4", "g.webm", "h.gif"]
  path = _jsonl(tmp_path / "m.jsonl", [{"path": n, "caption": n} for n in names])
  assert [e.is_image for e in manifest.read(path)] == [True] * 5 + [False] * 3


@pytest.mark.parametrize("name,content,words", [
    ("m.jsonl", "", "has no entries"),
    ("m.jsonl", "\n\n", "has no entries"),
    ("m.csv", "path,caption\n", "has no entries"),
    ("m.csv", "", "has no path or caption column"),
    ("m.csv", "path,text\na.mp4,hello\n", "has no caption column"),
    ("m.csv", "file,caption\na.mp4,hello\n", "has no path column"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "ok"}\n{"path": "b.mp4"}\n', r"m.jsonl:2: no caption field"),
    ("m.jsonl", '{"caption": "no path"}\n', r"m.jsonl:1: no path field"),
    ("m.jsonl", '{"path": "", "caption": "x"}\n', "path must be a non-empty string"),
    ("m.jsonl", '{"path": 3, "caption": "x"}\n', "path must be a non-empty string"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x"}\nnot json\n', r"m.jsonl:2: not valid JSON"),
    ("m.jsonl", '["a.mp4", "x"]\n', "expected a JSON object"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x", "start": "soon"}\n', "start='soon' is not a number"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x", "fps": [8]}\n', r"fps=\[8\] is not a number"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x", "start": -1}\n', "start=-1 must not be negative"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x", "start": 3, "end": 2}\n', "end=2.0 must be after start=3.0"),
    ("m.csv", "path,caption,end\na.mp4,x,1\nb.mp4,y,half\n", r"m.csv:3: end='half' is not a number"),
    ("m.csv", "path,caption,width\na.mp4,x,wide\n", "width='wide' is not a number"),
    ("m.txt", "a.mp4 a caption\n", "unknown format"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x", "width": "inf"}\n', "width='inf' is not a finite number"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x", "start": "nan"}\n', "start='nan' is not a finite number"),
    ("m.jsonl", '{"path": "a.mp4", "caption": "x", "end": 1e400}\n', "end=inf is not a finite number"),
    # An unquoted comma in a caption would silently cut it short; a row without a caption cell is a mistake too.
    ("m.csv", "path,caption\na.mp4,x\nb.mp4,a dog, running\n", r"m.csv:3: 3 cells, the header has 2; quote a caption"),
    ("m.csv", 'path,caption\na.mp4,"a dog,\nrunning"\nb.mp4\n', r"m.csv:4: no caption cell"),
])
def test_bad_manifest_is_a_user_error(tmp_path, name, content, words):
  (tmp_path / name).write_text(content)
  with pytest.raises(UserError, match=words):
    manifest.read(str(tmp_path / name))


def test_missing_manifest_and_empty_folder_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    manifest.read(str(tmp_path / "nope.jsonl"))
  with pytest.raises(UserError, match="needs a manifest"):
    manifest.read("")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no video or image file with a same-named .txt caption"):
    manifest.read(str(tmp_path / "empty"))
  (tmp_path / "uncaptioned").mkdir()
  write_mp4(tmp_path / "uncaptioned" / "a.mp4", scene_frames(0, 4, 16, 16))
  with pytest.raises(UserError, match="no video or image file"):
    manifest.read(str(tmp_path / "uncaptioned"))


def test_rows_of_missing_files_are_kept(tmp_path):
  # A missing file is not the manifest's error: the pipeline skips and counts it.
  path = _jsonl(tmp_path / "m.jsonl", [{"path": "gone.mp4", "caption": "x"}])
  [entry] = manifest.read(path)
  assert entry.path == str(tmp_path / "gone.mp4") and not os.path.exists(entry.path)


def test_numbers_are_parsed_not_trusted_as_strings(tmp_path):
  path = _jsonl(tmp_path / "m.jsonl", [{"path": "a.mp4", "caption": 12, "start": "0.25", "fps": "7.5",
                                        "width": 320.0, "height": "240", "duration": "1e1"}])
  [e] = manifest.read(path)
  assert (e.caption, e.start, e.fps, e.width, e.height, e.duration) == ("12", 0.25, 7.5, 320, 240, 10.0)
  assert np.isclose(e.start + e.fps, 7.75)


def test_a_manifest_that_is_not_utf8_is_a_user_error(tmp_path):
  for name, line, text in (("m.csv", 3, "path,caption\na.mp4,x\nb.mp4,un café\n"),
                           ("m.jsonl", 2, '{"path": "a.mp4", "caption": "x"}\n{"path": "b.mp4", "caption": "un café"}\n')):
    (tmp_path / name).write_bytes(text.encode("latin-1"))     # what a spreadsheet may save
    with pytest.raises(UserError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9\); save the manifest as UTF-8"):
      manifest.read(str(tmp_path / name))


def test_a_quoted_caption_keeps_its_commas_and_newlines(tmp_path):
  (tmp_path / "m.csv").write_text('path,caption\na.mp4,"a dog, running\non grass"\nb.mp4,""\n')
  assert manifest.read(str(tmp_path / "m.csv")) == [Entry(str(tmp_path / "a.mp4"), "a dog, running\non grass"),
                                                   Entry(str(tmp_path / "b.mp4"), "")]


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
  # Excel's "CSV UTF-8" and some Windows editors start the file with U+FEFF.
  (tmp_path / "m.csv").write_bytes("path,caption\na.mp4,un café\n".encode("utf-8-sig"))
  assert manifest.read(str(tmp_path / "m.csv")) == [Entry(str(tmp_path / "a.mp4"), "un café")]
  (tmp_path / "m.jsonl").write_bytes((json.dumps({"path": "a.mp4", "caption": "x"}) + "\n").encode("utf-8-sig"))
  assert manifest.read(str(tmp_path / "m.jsonl")) == [Entry(str(tmp_path / "a.mp4"), "x")]
