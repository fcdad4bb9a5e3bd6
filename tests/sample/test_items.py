"""Prompt files: modes read from their fields, media probed, problems reported by line and
item (skipped by default, stopping the job with --strict)."""

import json
import logging

import numpy as np
from PIL import Image
import pytest

from conftest import SMALL, TINY
from jaxvid import config
from jaxvid.errors import UserError
from jaxvid.sample import items as items_lib
from jaxvid.sample import writer


@pytest.fixture(scope="module")
def cfg():
  return config.load(TINY, SMALL)      # clips of 4 frames of 16x16 at 8 fps


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp("media")
  writer.write_mp4(root / "clip.mp4", np.full((12, 24, 32, 3), 90, np.uint8), fps=8)   # 1.5 s, 32x24
  writer.write_mp4(root / "short.mp4", np.full((2, 16, 16, 3), 90, np.uint8), fps=8)
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "still.png")
  Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "mask.png")        # the clip's size
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "mask16.png")      # the model's size
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "mask10.png")
  (root / "notes.txt").write_text("not media")
  return root


def _write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_modes_from_fields(cfg, media):
  path = _write(media / "p.jsonl", [
      {"prompt": "a"},
      {"prompt": "b", "id": "long", "frames": 10, "seed": 7},
      {"prompt": "c", "id": "i2v", "image": "still.png"},
      {"prompt": "d", "id": "ext", "video": "clip.mp4", "extend": 5},
      {"prompt": "e", "id": "inp", "video": "clip.mp4", "mask": "mask.png"},
      {"prompt": "f", "id": "box", "video": "clip.mp4", "mask": [[0, 0, 8, 8], [4, 4, 16, 16, 1, 3]]},
      {"prompt": "g", "id": "rs", "video": str(media / "clip.mp4"), "strength": 0.25, "negative_prompt": "blur"},
  ])
  got = {it.id: it for it in items_lib.read_prompts(path, cfg)}
  assert list(got) == ["00000", "long", "i2v", "ext", "inp", "box", "rs"]
  assert got["00000"].mode == "text-to-video" and got["00000"].frames == 4
  assert got["00000"].seed == items_lib.item_seed(cfg.sample.seed, "00000")
  assert (got["long"].frames, got["long"].seed) == (10, 7)
  assert got["i2v"].mode == "image-to-video" and got["i2v"].given == 1 and got["i2v"].frames == 4
  assert got["i2v"].image == str(media / "still.png")                  # relative to the prompt file
  ext = got["ext"]                                                      # 12 frames at 8 fps, + 5
  assert (ext.mode, ext.given, ext.frames, dict(ext.inputs)) == ("extend", 12, 17, {"video": "clip.mp4", "extend": 5})
  assert got["inp"].mode == "inpaint" and got["inp"].mask_image == str(media / "mask.png")
  assert got["box"].boxes == ((0, 0, 8, 8, 0, 4), (4, 4, 16, 16, 1, 3))
  assert (got["rs"].mode, got["rs"].strength, got["rs"].negative_prompt) == ("restyle", 0.25, "blur")


def test_txt_file_and_single_prompt(cfg, tmp_path):
  got = items_lib.read_prompts(_write(tmp_path / "p.txt", ["a red circle", "", "  a blue square  "]), cfg)
  assert [(it.id, it.prompt) for it in got] == [("00000", "a red circle"), ("00001", "a blue square")]
  [one] = items_lib.single_prompt("a red circle", cfg)
  assert one.id == "a_red_circle-0" and one.mode == "text-to-video"
  # Prompts whose id had to be cut or changed carry a hash of the whole prompt: no two collide.
  long = "a red circle moving left on a gray background while the camera slowly pans"
  ids = [items_lib.single_prompt(p, cfg)[0].id for p in (long + " to the right", long + " to the left",
                                                        "a/b", "a?b")]
  assert len(set(ids)) == 4 and ids[0].startswith("a_red_circle_moving_left") and len(ids[0]) < 80, ids
  assert all(writer.sanitize_id(i) == i for i in ids)


PROBLEMS = [
    ('{"prompt": broken', "not valid JSON"),
    ({"text": "no prompt"}, 'each line needs a "prompt" string'),
    ({"prompt": "a", "id": "x"}, None),
    ({"prompt": "a", "id": "x"}, "id 'x' is also on line 4; ids must be unique"),
    ({"prompt": "a", "seed": "one"}, r"has seed 'one'; seeds are integers in \[0, 2\*\*31\)"),
    ({"prompt": "a", "seed": 2**31}, "has seed 2147483648; seeds are integers"),
    ({"prompt": "a", "seed": -1}, "has seed -1; seeds are integers"),
    ({"prompt": "a", "colour": "red"}, "unknown field 'colour'"),
    ({"prompt": "a", "image": "still.png", "video": "clip.mp4"}, "do not make a mode"),
    ({"prompt": "a", "video": "clip.mp4"}, "do not make a mode"),
    ({"prompt": "a", "video": "clip.mp4", "strength": 1.5}, r'"strength" must be a number in \[0, 1\]'),
    ({"prompt": "a", "video": "clip.mp4", "strength": "high"}, '"strength" must be a number'),
    ({"prompt": "a", "video": "clip.mp4", "extend": 0}, r'"extend" must be a number of frames in \[1, 10000\]'),
    ({"prompt": "a", "frames": 0}, r'"frames" must be an integer in \[1, 10000\]'),
    ({"prompt": "a", "frames": 10**9}, r'"frames" must be an integer in \[1, 10000\]'),
    ({"prompt": "a", "image": "still.png", "frames": 1}, r'"frames" must be an integer in \[2, 10000\]'),
    ({"prompt": "a", "video": "clip.mp4", "extend": 9995}, "the video would pass 10000 frames"),
    ({"prompt": "a", "video": "clip.mp4", "strength": 0.5, "frames": 8}, '"frames" is for'),
    ({"prompt": "a", "video": "missing.mp4", "strength": 0.5}, "missing.mp4: file not found"),
    ({"prompt": "a", "video": "notes.txt", "strength": 0.5}, "notes.txt: not a readable video"),
    ({"prompt": "a", "video": "still.png", "extend": 3}, 'is an image; use "image"'),
    ({"prompt": "a", "image": "clip.mp4"}, "is not an image file"),
    ({"prompt": " "}, '"prompt" is empty; give the text of the video to generate'),
    ({"prompt": "a", "video": "short.mp4", "strength": 0.5}, "has 2 frames at video.fps=8; restyle needs at least 4"),
    ({"prompt": "a", "video": "clip.mp4", "mask": "mask10.png"}, "mask .*mask10.png is 10x10; it must be the video's "
                                                                 "size 32x24 or the model's 16x16"),
    ({"prompt": "a", "video": "clip.mp4", "mask": "nomask.png"}, "mask .*nomask.png not found"),
    ({"prompt": "a", "video": "clip.mp4", "mask": [[0, 0, 20, 8]]}, r"box \[0, 0, 20, 8\]: .* within the 16x16"),
    ({"prompt": "a", "video": "clip.mp4", "mask": [[0, 0, 8, 8, 2, 9]]}, "box"),
    ({"prompt": "a", "video": "clip.mp4", "mask": []}, '"mask" must be an image path or a list of boxes'),
]


def test_problems_are_reported_by_line_and_skipped(cfg, media, caplog):
  rows = [{"prompt": "fine", "id": "ok"}] + [r for r, _ in PROBLEMS]
  path = _write(media / "bad.jsonl", rows)
  with caplog.at_level(logging.WARNING, logger="jaxvid"):
    got = items_lib.read_prompts(path, cfg)
  assert [it.id for it in got] == ["ok", "x"]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  expected = [(n, words) for n, (_, words) in enumerate(PROBLEMS, 2) if words]
  assert len(warnings) == len(expected), "\n".join(warnings)
  import re
  for (n, words), message in zip(expected, warnings):
    assert message.startswith(f"{path}:{n}: ") and message.endswith("; skipped"), message
    assert re.search(words, message), (words, message)


def test_strict_stops_at_the_first_problem_before_any_work(cfg, media):
  path = _write(media / "strict.jsonl", [{"prompt": "fine"}, {"prompt": "a", "video": "clip.mp4", "strength": 2},
                                         "{oops"])
  with pytest.raises(UserError) as e:
    items_lib.read_prompts(path, cfg, strict=True)
  assert str(e.value) == (f"{path}:2: item '00001': \"strength\" must be a number in [0, 1] (0 keeps the video, 1 "
                          "ignores it), got 2 (and 1 more problems); fix the file, or drop --strict to skip such lines")


def test_nothing_usable_and_missing_file(cfg, tmp_path):
  with pytest.raises(UserError, match="has no usable prompts"):
    items_lib.read_prompts(_write(tmp_path / "p.jsonl", ["{oops"]), cfg)
  with pytest.raises(UserError, match="has no usable prompts"):
    items_lib.read_prompts(_write(tmp_path / "e.jsonl", []), cfg)
  with pytest.raises(UserError, match="prompt file .*nope.jsonl not found"):
    items_lib.read_prompts(str(tmp_path / "nope.jsonl"), cfg)
  with pytest.raises(UserError, match="is a folder; give a .txt or .jsonl file"):
    items_lib.read_prompts(str(tmp_path), cfg)
  (tmp_path / "list.json").write_text('[\n  {"prompt": "a"},\n  {"prompt": "b"}\n]\n')
  with pytest.raises(UserError, match="starts with a JSON array; write one object a line"):
    items_lib.read_prompts(str(tmp_path / "list.json"), cfg)


def test_the_format_goes_by_the_extension_in_any_case(cfg, tmp_path):
  rows = [{"prompt": "a", "id": "named", "seed": 3}, {"prompt": "b", "id": None}, {"prompt": "c", "id": 7}]
  for name in ("p.JSONL", "p.json", "p.jsonl"):
    got = items_lib.read_prompts(_write(tmp_path / name, rows), cfg)
    assert [(it.id, it.prompt) for it in got] == [("named", "a"), ("00001", "b"), ("7", "c")]   # "id": null: no id
    assert got[0].seed == 3
  got = items_lib.read_prompts(_write(tmp_path / "p.TXT", ["a cat", "a dog"]), cfg)
  assert [(it.id, it.prompt) for it in got] == [("00000", "a cat"), ("00001", "a dog")]
  for name in ("prompts", "p.csv"):
    with pytest.raises(UserError, match=r"unknown format .*; name it .txt \(a prompt a line\) or .jsonl"):
      items_lib.read_prompts(_write(tmp_path / name, ["a cat"]), cfg)


def test_default_ids_do_not_move_when_a_bad_line_is_fixed(cfg, tmp_path):
  """Ids name items in a resumed job: an item without one is named by its place among the
  non-blank lines, bad lines included."""
  before = items_lib.read_prompts(_write(tmp_path / "a.jsonl", [{"prompt": "A"}, "{oops", {"prompt": "B"}]), cfg)
  after = items_lib.read_prompts(_write(tmp_path / "b.jsonl", [{"prompt": "A"}, {"prompt": "C"}, {"prompt": "B"}]),
                                 cfg)
  assert [(it.id, it.prompt) for it in before] == [("00000", "A"), ("00002", "B")]
  assert [(it.id, it.prompt) for it in after] == [("00000", "A"), ("00001", "C"), ("00002", "B")]
  assert before[1].seed == after[2].seed


def test_unreadable_prompt_file_and_prompt_without_safe_characters(cfg, tmp_path):
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
  with pytest.raises(UserError, match="cannot be read .*UnicodeDecodeError.*give a UTF-8 text file"):
    items_lib.read_prompts(str(tmp_path / "latin1.txt"), cfg)
  [one] = items_lib.single_prompt("日本の猫", cfg)
  assert one.id.startswith("prompt-") and writer.sanitize_id(one.id) == one.id


def test_ids_are_sanitized_so_nothing_is_written_outside_the_folder(cfg, tmp_path):
  got = items_lib.read_prompts(_write(tmp_path / "p.jsonl", [{"prompt": "a", "id": "../../x"},
                                                             {"prompt": "b", "id": "a/b c"}]), cfg)
  assert [it.id for it in got] == ["x", "a_b_c"]
