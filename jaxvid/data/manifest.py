"""What a dataset of video files is: a manifest of (path, caption, window, fps) entries.

Three ways to describe one, chosen by what `data.manifest` points at:

  data.jsonl   one JSON object a line: {"path", "caption", "start"?, "end"?, "fps"?, ...}
  data.csv     a header row with at least `path` and `caption`, the same optional columns
  a folder     every video or image file in it (recursively) whose same-named `.txt` file
               holds its caption: clips/cat.mp4 + clips/cat.txt

Relative paths are taken from the manifest's folder. `start` and `end` are seconds into the
file (the clip is that window); `fps` is the frame rate to sample this clip at (it overrides
`data.fps`). Optional `width`, `height` and `duration` (seconds) columns describe the file so
that it need not be probed at startup (see video_files.probe; a video is still probed for its
frame rate when neither its `fps` nor `data.fps` is set). Images (png, jpg, ...) are
one-frame videos, for joint image and video training.

Errors here are the user's (a missing manifest, no caption column, no usable entry) and stop
the job at startup; a bad *file* never does (see video_files and pipeline).
"""

import csv
import dataclasses
import json
import logging
import math
import os

from jaxvid.errors import UserError

log = logging.getLogger("jaxvid")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".m4v", ".mpg", ".mpeg", ".ogv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One clip: a file (absolute path), its caption, and optionally a window and a frame rate.

  width, height, duration: what the manifest says about the file (0: unknown, probe it).
  """
  path: str
  caption: str
  start: float = 0.0
  end: float = 0.0           # 0: to the end of the file
  fps: float = 0.0           # 0: data.fps (or data.stride)
  width: int = 0
  height: int = 0
  duration: float = 0.0

  @property
  def is_image(self) -> bool:
    return self.path.lower().endswith(IMAGE_EXTENSIONS)

  @property
  def key(self) -> str:
    """Names the clip (file and window) in logs and in the latent cache's index."""
    if self.start or self.end:
      return f"{self.path}[{self.start:g}:{self.end:g}]"
    return self.path


def read(path: str) -> list[Entry]:
  """The entries of a JSONL or CSV manifest, or of a folder of files with .txt captions.

  Raises UserError for a missing manifest, a missing path or caption column, a malformed
  row, or a manifest without any entry. Rows whose file is missing are kept: the pipeline
  skips and counts them like any other unreadable file.
  """
  if not path:
    raise UserError("data.source needs a manifest: set --config.data.manifest=FILE.jsonl, FILE.csv or a folder")
  if os.path.isdir(path):
    entries = _read_folder(path)
  elif not os.path.isfile(path):
    raise UserError(f"manifest {path} not found; set --config.data.manifest to a .jsonl, .csv or a folder")
  elif path.lower().endswith(".csv"):
    entries = _read_csv(path)
  elif path.lower().endswith((".jsonl", ".json")):
    entries = _read_jsonl(path)
  else:
    raise UserError(f"manifest {path}: unknown format; use .jsonl, .csv or a folder of videos with .txt captions")
  if not entries:
    raise UserError(f"manifest {path} has no entries; add rows with a path and a caption")
  return entries


def _entry(row: dict, base: str, where: str) -> Entry:
  missing = [k for k in ("path", "caption") if k not in row]
  if missing:
    raise UserError(f"{where}: no {' or '.join(missing)} field; every entry needs a path and a caption")
  if not isinstance(row["path"], str) or not row["path"]:
    raise UserError(f"{where}: path must be a non-empty string")
  caption = row["caption"]
  if caption is None:
    caption = ""
  numbers = {}
  for k, kind in (("start", float), ("end", float), ("fps", float), ("width", int), ("height", int),
                  ("duration", float)):
    value = row.get(k)
    if value in (None, ""):
      continue
    try:
      number = float(value)
    except (TypeError, ValueError):
      raise UserError(f"{where}: {k}={value!r} is not a number") from None
    if not math.isfinite(number):
      raise UserError(f"{where}: {k}={value!r} is not a finite number")
    numbers[k] = kind(number)
    if numbers[k] < 0:
      raise UserError(f"{where}: {k}={value!r} must not be negative")
  if numbers.get("end", 0) and numbers["end"] <= numbers.get("start", 0):
    raise UserError(f"{where}: end={numbers['end']} must be after start={numbers.get('start', 0)}")
  full = row["path"] if os.path.isabs(row["path"]) else os.path.normpath(os.path.join(base, row["path"]))
  return Entry(path=full, caption=str(caption), **numbers)


def _utf8(path: str):
  """`path` opened as UTF-8 text, after checking that it is: UserError naming the line otherwise
  (a manifest saved as Latin-1 or UTF-16 by a spreadsheet)."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as e:
        raise UserError(f"{path}:{number}: not UTF-8 text (byte {line[e.start]:#x}); save the manifest "
                        "as UTF-8") from None
  return open(path, encoding="utf-8-sig", newline="")   # -sig: a byte order mark (Windows editors) is not data


def _read_jsonl(path: str) -> list[Entry]:
  base = os.path.dirname(os.path.abspath(path))
  entries = []
  with _utf8(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove the line") from None
      if not isinstance(row, dict):
        raise UserError(f"{path}:{number}: expected a JSON object with path and caption")
      entries.append(_entry(row, base, f"{path}:{number}"))
  return entries


def _read_csv(path: str) -> list[Entry]:
  base = os.path.dirname(os.path.abspath(path))
  with _utf8(path) as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or ()]
    missing = [c for c in ("path", "caption") if c not in columns]
    if missing:
      raise UserError(f"manifest {path} has no {' or '.join(missing)} column (columns: {', '.join(columns) or 'none'}); "
                      "the header row needs path and caption")
    entries = []
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if None in row:      # more cells than the header: an unquoted comma, most often in the caption
        raise UserError(f"{where}: {len(columns) + len(row[None])} cells, the header has {len(columns)}; "
                        'quote a caption that holds a comma ("a dog, running")')
      row = {k.strip(): v for k, v in row.items()}
      missing = [c for c in ("path", "caption") if row[c] is None]
      if missing:          # fewer cells than the header, and the row stops before these columns
        raise UserError(f"{where}: no {' or '.join(missing)} cell; every row needs a path and a caption")
      entries.append(_entry(row, base, where))
    return entries


def _read_folder(path: str) -> list[Entry]:
  entries = []
  for folder, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        continue
      caption_path = os.path.join(folder, stem + ".txt")
      if not os.path.isfile(caption_path):
        log.warning("no caption file %s: %s is not used", caption_path, os.path.join(folder, name))
        continue
      with open(caption_path, encoding="utf-8", errors="replace") as f:
        caption = " ".join(f.read().split())
      entries.append(Entry(path=os.path.join(os.path.abspath(folder), name), caption=caption))
  if not entries:
    raise UserError(f"folder {path} has no video or image file with a same-named .txt caption")
  return entries
