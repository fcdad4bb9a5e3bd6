"""The output folder of a sampling job: videos, records, a manifest, a gallery.

Layout of a folder (`ID` is a sanitized item id, see `sanitize_id`):

  ID.mp4          H.264, yuv420p, moov atom first (plays in a browser).
  ID.json         The item's record (prompt, seed, ...) plus "id" and "video".
  manifest.jsonl  One JSON line per finished item; a resumed job skips them.
  index.html      A gallery of every finished item, in manifest order.

Files are written under a temporary name in the same folder and renamed into
place, and an item's manifest line is appended only after its ID.mp4 and
ID.json are in place, so a killed job leaves either a finished item or nothing
under the final names.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import os
import re
import secrets
from collections.abc import Callable

import imageio.v2 as iio2
import imageio.v3 as iio3
import numpy as np

from jaxvid.errors import UserError

MANIFEST = "manifest.jsonl"
GALLERY = "index.html"
MAX_ID_LEN = 100

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def sanitize_id(raw: str) -> str:
  """Returns a safe, deterministic file stem for an item id.

  Characters outside [A-Za-z0-9._-] become "_" (one per code point), leading
  dots and underscores are stripped (so "../../x" becomes "x" and cannot leave
  the folder), and the result is cut to 100 characters. Distinct ids can map to
  the same stem ("a b" and "a/b"); callers pick ids that differ in safe chars.

  Args:
    raw: any string, e.g. a prompt-derived name.

  Returns:
    A non-empty stem that is its own sanitization.

  Raises:
    ValueError: if nothing usable is left (e.g. "", "..", "日本").
  """
  stem = _UNSAFE_CHARS.sub("_", raw).lstrip("._")[:MAX_ID_LEN]
  if not stem:
    raise ValueError(
        f"item id {raw!r} has no usable characters; use letters, digits, '.',"
        " '_' or '-'")
  return stem


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
  """Encodes frames as a browser-playable H.264 (yuv420p) MP4 file.

  Args:
    path: the output file, named *.mp4; overwritten if it exists.
    frames: uint8 [T, H, W, 3] RGB frames, T >= 1, H and W even.
    fps: frames per second, > 0.

  Raises:
    ValueError: on a wrong shape or dtype, odd H or W, or fps <= 0.
    OSError: if ffmpeg wrote no output.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(
        f"frames must be [T, H, W, 3] with T >= 1, got {frames.shape}.")
  if frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8, got {frames.dtype}.")
  _, height, width, _ = frames.shape
  if height % 2 or width % 2:
    raise ValueError(
        f"H.264 yuv420p needs an even height and width, got {height}x{width}"
        " (HxW); crop or pad the frames to even sizes.")
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}.")
  writer = iio2.get_writer(
      os.fspath(path), format="FFMPEG", mode="I", fps=fps, codec="libx264",
      pixelformat="yuv420p",
      macro_block_size=2,  # Sizes are even (checked above): never rescaled.
      quality=None,  # Rate control is the -crf below.
      ffmpeg_log_level="error",
      output_params=["-crf", "18", "-movflags", "+faststart"])
  try:
    for frame in frames:
      writer.append_data(frame)
  finally:
    writer.close()
  # imageio does not check ffmpeg's exit status; an empty file means it failed.
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    raise OSError(f"ffmpeg wrote no video to {os.fspath(path)!r}.")


def read_mp4(path: str | os.PathLike) -> np.ndarray:
  """Decodes a video file into uint8 [T, H, W, 3] RGB frames."""
  return iio3.imread(os.fspath(path), plugin="FFMPEG", index=None)


def _to_json(value):
  """`json.dumps` fallback for numpy scalars and arrays in records."""
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  raise TypeError(
      f"{type(value).__name__} in a record is not JSON serializable.")


class OutputFolder:
  """An output folder of a sampling job.

  Writes are atomic (write to a temp name in the same folder, then os.replace),
  so a killed job never leaves a half-written ID.mp4 or ID.json under its final
  name; manifest.jsonl is appended (flush + fsync) only after both files are in
  place. Items' files may come from several processes; the manifest and the
  gallery from one.
  """

  def __init__(self, path: str | os.PathLike, title: str = "jaxvid samples"):
    """Opens the folder at `path`, creating it (and its parents) if needed.

    A new folder gets an empty manifest.jsonl at once, which marks it as a
    sample folder. A folder that holds other files and no manifest is refused
    (UserError), so a job never writes over files it did not make.
    """
    self.path = os.fspath(path)
    self.title = title
    check_output(self.path)
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise UserError(f"--output {self.path} cannot be made ({e.strerror or e}); choose a folder you can "
                      "write") from None
    manifest = os.path.join(self.path, MANIFEST)
    if os.path.exists(manifest):
      foreign = _first_foreign_line(manifest)
      if foreign:
        raise UserError(
            f"--output {self.path} holds a {MANIFEST} whose line {foreign} is "
            "not a jaxvid sample record, so it is not a sample folder; choose "
            "a new or empty folder")
    else:
      others = [f for f in os.listdir(self.path) if not f.startswith(".")]
      if others:
        raise UserError(
            f"--output {self.path} holds files ({others[0]}, ...) and no "
            f"{MANIFEST}, so it is not a sample folder; choose a new or empty "
            "folder")
      with open(manifest, "ab"):
        pass

  def done_ids(self) -> set[str]:
    """Returns the ids of the items in manifest.jsonl."""
    return set(self.done_entries())

  def done_entries(self) -> dict[str, dict]:
    """Returns {id: manifest entry} of the items in manifest.jsonl."""
    return {entry["id"]: entry for entry in self._manifest_entries()}

  def write_item(self, item_id: str, frames: np.ndarray, fps: int,
                 record: dict) -> None:
    """Writes ID.mp4 and ID.json, then appends the item's manifest line.

    Does not rebuild index.html; call `write_gallery` for that (e.g. after each
    batch). Writing an id again replaces its files and record. (A job on several
    processes calls `write_files` where each item is made and `add_to_manifest`
    on one process, once the files are in place.)

    Args:
      item_id: an already sanitized id (`sanitize_id(item_id) == item_id`).
      frames: uint8 [T, H, W, 3] RGB frames, H and W even.
      fps: frames per second.
      record: JSON-serializable dict with at least "prompt" (and usually seed,
        sampler, steps, guidance, checkpoint step, config hash, mode, inputs).
        It must not hold "id" or "video" keys with other values.

    Raises:
      ValueError: on an unsanitized id, a bad record, or bad frames.
    """
    self.write_files(item_id, frames, fps, record)
    self.add_to_manifest([(item_id, record)])

  def write_files(self, item_id: str, frames: np.ndarray, fps: int,
                  record: dict) -> None:
    """Writes ID.mp4 and ID.json (atomically); see `write_item` for the args."""
    entry = _entry(item_id, record)
    entry_text = json.dumps(
        entry, default=_to_json, ensure_ascii=False, indent=2)
    self._write_atomic(
        f"{item_id}.mp4", lambda tmp: write_mp4(tmp, frames, fps))
    self._write_atomic(
        f"{item_id}.json", lambda tmp: _write_bytes(tmp, entry_text + "\n"))

  def add_to_manifest(self, items: list[tuple[str, dict]]) -> None:
    """Appends a manifest line per (item_id, record) whose files are in place."""
    lines = "".join(json.dumps(_entry(item_id, record), default=_to_json) + "\n"
                    for item_id, record in items)   # ASCII only.
    if lines:
      self._append_manifest(lines)

  def write_gallery(self) -> None:
    """(Re)writes index.html from manifest.jsonl, in manifest order."""
    cards = [_gallery_card(entry) for entry in self._manifest_entries()]
    title = html.escape(self.title)
    page = _GALLERY_PAGE.format(
        title=title, count=len(cards), cards="\n".join(cards))
    self._write_atomic(GALLERY, lambda tmp: _write_bytes(tmp, page))

  def _write_atomic(self, name: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)`, syncs it and renames it to `name`."""
    # A leading dot keeps temp names apart from sanitized ids; the extension
    # stays last for imageio and ffmpeg. (Not mkstemp: its files are 0600.)
    stem, ext = os.path.splitext(name)
    # A killed job can leave a temp file of this name behind; in a job one
    # process writes a name, so an old temp file of exactly this name is stale.
    stale = re.compile(re.escape(f".{stem}.tmp-") + "[0-9a-f]{12}" + re.escape(ext))
    for old in filter(stale.fullmatch, os.listdir(self.path)):
      with contextlib.suppress(FileNotFoundError):   # removed meanwhile
        os.remove(os.path.join(self.path, old))
    tmp = os.path.join(self.path, f".{stem}.tmp-{secrets.token_hex(6)}{ext}")
    try:
      write(tmp)
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
      os.replace(tmp, os.path.join(self.path, name))
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  def _append_manifest(self, line: str) -> None:
    """Appends line(s); first ends a truncated last line left by a kill."""
    with open(os.path.join(self.path, MANIFEST), "a+b") as f:
      data = line.encode("utf-8")
      if f.seek(0, os.SEEK_END) > 0:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          data = b"\n" + data
      f.write(data)
      f.flush()
      os.fsync(f.fileno())

  def _manifest_entries(self) -> list[dict]:
    """Returns the manifest's entries, one per id (the last one wins).

    Unreadable lines (a line cut short by a killed job) are skipped.
    """
    try:
      with open(os.path.join(self.path, MANIFEST), "rb") as f:
        lines = f.read().split(b"\n")
    except FileNotFoundError:
      return []
    entries = {}
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        entries[entry["id"]] = entry  # Keeps the id's first position.
      except (ValueError, TypeError, KeyError):
        if number < len(lines):  # Only a last line may be cut short.
          logging.warning("Skipping unreadable line %d of %s.", number,
                          os.path.join(self.path, MANIFEST))
    return list(entries.values())


def check_output(path: str) -> None:
  """Raises UserError unless `path` is a folder or can be made one (cheap: run it
  before loading a model, so that a wrong --output fails at once)."""
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise UserError(f"--output {path} exists and is not a folder")
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UserError(f"--output {path}: {parent} is a file, not a folder; choose another --output")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"--output {path}: {parent} is not writable; choose another --output")


def _first_foreign_line(manifest: str) -> int:
  """The number of the first line of `manifest` that is JSON but not a sample
  record ({"id", "video", "prompt", ...}); 0 if none is."""
  with open(manifest, "rb") as f:
    for number, line in enumerate(f, start=1):
      try:
        entry = json.loads(line)
      except ValueError:   # blank, or cut short by a killed job
        continue
      if not (isinstance(entry, dict) and {"id", "video", "prompt"} <= set(entry)):
        return number
  return 0


def _entry(item_id: str, record: dict) -> dict:
  """The item's record with "id" and "video"; checks the id and the record."""
  if sanitize_id(item_id) != item_id:
    raise ValueError(
        f"Item id {item_id!r} is not sanitized; pass sanitize_id(item_id).")
  if "prompt" not in record:
    raise ValueError(f"The record of item {item_id!r} has no 'prompt'.")
  entry = {"id": item_id, "video": f"{item_id}.mp4"}
  for key, value in record.items():
    if key in entry and value != entry[key]:
      raise ValueError(
          f"The record of item {item_id!r} sets {key!r}={value!r}; this key"
          " is reserved.")
    entry[key] = value
  return entry


def _write_bytes(path: str, text: str) -> None:
  with open(path, "wb") as f:
    f.write(text.encode("utf-8"))


def _gallery_card(entry: dict) -> str:
  """Returns the HTML of one gallery item."""
  item_id = html.escape(str(entry["id"]))
  video = html.escape(str(entry.get("video", f"{entry['id']}.mp4")))
  prompt = html.escape(str(entry.get("prompt", "")))
  seed = html.escape(str(entry.get("seed", "?")))
  mode = html.escape(str(entry.get("mode", "")))
  mode = f"{mode} &middot; " if mode else ""
  return (
      f'<figure id="{item_id}">'
      f'<video src="{video}" autoplay loop muted playsinline></video>'
      f'<figcaption><p>{prompt}</p>'
      f'<small>{mode}seed {seed} &middot; <a href="{item_id}.json">{item_id}.json</a>'
      '</small></figcaption></figure>')


_GALLERY_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.grid {{ display: grid; gap: 1em;
         grid-template-columns: repeat(auto-fill, minmax(256px, 1fr)); }}
figure {{ margin: 0; }}
video {{ width: 256px; height: 256px; object-fit: contain; background: #000;
         image-rendering: pixelated; }}
figcaption p {{ margin: 0.3em 0; overflow-wrap: anywhere; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{count} items</p>
<div class="grid">
{cards}
</div>
</body>
</html>
"""
