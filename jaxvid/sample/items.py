"""What to sample: prompt files read into checked items, one per video.

A `.txt` file has one prompt a line. A `.jsonl` file has one object a line:

  {"prompt": ..., "id"?: ..., "seed"?: ..., "negative_prompt"?: ..., plus the fields of a mode}

  mode              fields                                   output
  text-to-video     (none) or "frames": F                    F frames (default video.frames;
                                                             longer: generated chunk by chunk)
  image-to-video    "image": PATH [, "frames": F]            the image, then F - 1 new frames
  extend            "video": PATH, "extend": N               the clip, then N new frames
  inpaint           "video": PATH, "mask": PNG | BOXES       video.frames frames; only the masked
                                                             region is regenerated
  restyle           "video": PATH, "strength": S in [0, 1]   video.frames frames: the clip noised
                                                             to t = S, denoised with the prompt

Media paths are relative to the prompt file. Images and videos are scaled to cover the model's
frame (video.height x video.width) and center-cropped; videos are read at video.fps. A mask
image is white (>= 128) where the video is regenerated, the size of the video's frames or of
the model's; BOXES is a list of [x0, y0, x1, y1] or [x0, y0, x1, y1, f0, f1] in pixels of the
model's frame, with the frames [f0, f1) they cover (default: all).

A line that cannot be used (bad JSON, a missing or empty prompt, a missing or unreadable media file, a
clip too short for its mode, a mask of the wrong size, a strength outside [0, 1], ...) is a
problem naming the file, line and item: by default it is logged and skipped; with `strict`
the job stops before any work.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
import zlib

import ml_collections
from PIL import Image

from jaxvid.data import video_files
from jaxvid.data.manifest import Entry
from jaxvid.errors import UserError
from jaxvid.sample import writer

log = logging.getLogger("jaxvid")

MAX_FRAMES = 10_000   # the longest output video, in frames
MODES = ("text-to-video", "image-to-video", "extend", "inpaint", "restyle")
# The fields that pick a mode (besides "frames", which text-to-video and image-to-video take).
_MODE_FIELDS = {frozenset(): "text-to-video", frozenset({"image"}): "image-to-video",
                frozenset({"video", "extend"}): "extend", frozenset({"video", "mask"}): "inpaint",
                frozenset({"video", "strength"}): "restyle"}
_KNOWN_FIELDS = {"prompt", "id", "seed", "negative_prompt", "frames", "image", "video", "extend", "mask", "strength"}


@dataclasses.dataclass(frozen=True)
class Item:
  """One video to sample. Paths are absolute; `frames` is the length of the output video and
  `given` the number of input frames it starts from (image-to-video 1, extend the clip's
  length at video.fps, inpaint and restyle video.frames, text-to-video 0)."""
  id: str
  prompt: str
  seed: int
  negative_prompt: str
  mode: str = "text-to-video"
  frames: int = 0
  given: int = 0
  image: str = ""
  video: str = ""
  mask_image: str = ""
  boxes: tuple[tuple[int, ...], ...] = ()
  strength: float = 1.0
  extend: int = 0                                 # extend: new frames after the clip
  inputs: tuple[tuple[str, object], ...] = ()    # the mode's fields as given, for the item's record


class Problem(Exception):
  """An item that cannot be sampled; the message names what to fix."""


def item_seed(base: int, item_id: str) -> int:
  """The seed of an item without one: the base seed folded with its id."""
  return (base * 1_000_003 + zlib.crc32(item_id.encode())) % (2**31 - 1)


def single_prompt(prompt: str, cfg: ml_collections.ConfigDict) -> list[Item]:
  """The item of `jaxvid sample --prompt TEXT` (text-to-video, id from the prompt and seed)."""
  if not prompt.strip():
    raise UserError("--prompt is empty; give the text of the video to generate")
  name = prompt.strip().replace(" ", "_")
  digest = f"{zlib.crc32(prompt.encode()):08x}"
  try:
    slug = writer.sanitize_id(name[:60])
    if slug != name:     # cut or changed: the hash keeps two such prompts apart
      slug = f"{slug}-{digest}"
  except ValueError:   # nothing in [A-Za-z0-9._-]: name it by a hash of the prompt
    slug = f"prompt-{digest}"
  item_id = f"{slug}-{cfg.sample.seed}"
  return [Item(item_id, prompt, item_seed(cfg.sample.seed, item_id), cfg.sample.negative_prompt,
               frames=cfg.video.frames)]


# Prompt file extensions (any case) and how their lines are read.
PROMPT_FORMATS = {".txt": "text", ".jsonl": "jsonl", ".json": "jsonl"}


def read_prompts(path: str, cfg: ml_collections.ConfigDict, strict: bool = False) -> list[Item]:
  """The usable items of a `.jsonl` or `.txt` prompt file, in file order.

  Problems are logged and their lines skipped; with `strict` the first one stops the job
  (UserError) before any work. Raises UserError if the file is missing or nothing is usable.
  """
  if os.path.isdir(path):
    raise UserError(f"prompt file {path} is a folder; give a .txt or .jsonl file")
  if not os.path.isfile(path):
    raise UserError(f"prompt file {path} not found")
  ext = os.path.splitext(path)[1].lower()
  if ext not in PROMPT_FORMATS:
    raise UserError(f"prompt file {path}: unknown format {ext or '(no extension)'}; name it .txt (a prompt a line) "
                    "or .jsonl (a JSON object a line)")
  jsonl = PROMPT_FORMATS[ext] == "jsonl"
  try:
    with open(path, encoding="utf-8-sig") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"prompt file {path} cannot be read ({type(e).__name__}: {e}); give a UTF-8 text file") from None
  if jsonl and lines and lines[0].lstrip().startswith("["):
    raise UserError(f"prompt file {path} starts with a JSON array; write one object a line (JSON Lines), "
                    '{"prompt": ...} on each')
  base = os.path.dirname(os.path.abspath(path))
  # An item without an id is named by its place among the non-blank lines, bad ones included,
  # so fixing a bad line does not rename the items after it (a resumed job goes by ids).
  rows, problems = [], []
  for k, (n, line) in enumerate((n, line) for n, line in enumerate(lines, 1) if line.strip()):
    if jsonl:
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        problems.append((n, f"not valid JSON ({e.msg})"))
        continue
      if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        problems.append((n, 'each line needs a "prompt" string'))
        continue
      if not row["prompt"].strip():    # as --prompt: an empty one is a mistake, not a request
        problems.append((n, '"prompt" is empty; give the text of the video to generate'))
        continue
    else:
      row = {"prompt": line.strip()}
    rows.append((n, k, row))

  candidates, seen = [], {}
  for n, k, row in rows:
    try:
      given = row.get("id")
      item_id = writer.sanitize_id(f"{k:05d}" if given is None else str(given))     # "id": null is no id
      if item_id in seen:
        raise Problem(f"id {item_id!r} is also on line {seen[item_id]}; ids must be unique")
      seen[item_id] = n
      candidates.append((n, parse_item(row, item_id, cfg, base)))
    except (Problem, ValueError) as e:
      problems.append((n, str(e)))
  # Media files are probed in threads (each probe of a video runs ffmpeg).
  with concurrent.futures.ThreadPoolExecutor(max(1, cfg.data.probe_threads)) as pool:
    checked = list(pool.map(lambda c: _check_media(c[1], cfg), candidates))
  items = []
  for (n, _), result in zip(candidates, checked):
    if isinstance(result, Problem):
      problems.append((n, str(result)))
    else:
      items.append(result)

  problems.sort()
  if problems and strict:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    n, message = problems[0]
    raise UserError(f"{path}:{n}: {message}{more}; fix the file, or drop --strict to skip such lines")
  for n, message in problems:
    log.warning("%s:%d: %s; skipped", path, n, message)
  if not items:
    raise UserError(f"prompt file {path} has no usable prompts" + (" (see the problems above)" if problems else ""))
  return items


def parse_item(row: dict, item_id: str, cfg: ml_collections.ConfigDict, base: str) -> Item:
  """The item of one JSON object (paths relative to `base`); raises Problem naming the field.
  Media files are not opened here (see `_check_media`)."""
  name = f"item {item_id!r}"
  unknown = sorted(set(row) - _KNOWN_FIELDS)
  if unknown:
    raise Problem(f"{name}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(_KNOWN_FIELDS))}")
  seed = row.get("seed", item_seed(cfg.sample.seed, item_id))
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
    raise Problem(f"{name} has seed {seed!r}; seeds are integers in [0, 2**31)")
  negative = row.get("negative_prompt", cfg.sample.negative_prompt)
  if not isinstance(negative, str):
    raise Problem(f'{name}: "negative_prompt" must be a string')
  fields = frozenset(k for k in ("image", "video", "extend", "mask", "strength") if k in row)
  mode = _MODE_FIELDS.get(fields)
  if mode is None:
    raise Problem(f"{name}: the fields {sorted(fields)} do not make a mode; use \"image\"; or \"video\" with one "
                  "of \"extend\", \"mask\" or \"strength\"")
  if "frames" in row and mode not in ("text-to-video", "image-to-video"):
    raise Problem(f'{name}: "frames" is for text-to-video and image-to-video; {mode} sets the length itself')
  T = cfg.video.frames
  if T < 2 and (mode in ("image-to-video", "extend") or row.get("frames", T) > T):
    raise Problem(f"{name}: {mode} beyond one clip needs a model of clips of 2 frames or more (video.frames={T})")
  item = Item(item_id, row["prompt"], seed, negative, mode, frames=row.get("frames", T),
              inputs=tuple((k, row[k]) for k in ("image", "video", "extend", "frames", "mask", "strength") if k in row))
  if not _positive_int(item.frames) or (mode == "image-to-video" and item.frames < 2) or item.frames > MAX_FRAMES:
    raise Problem(f'{name}: "frames" must be an integer in [{2 if mode == "image-to-video" else 1}, {MAX_FRAMES}], '
                  f"got {item.frames!r}")
  media = lambda key: _path(row[key], key, name, base)
  if mode == "image-to-video":
    return dataclasses.replace(item, image=media("image"), given=1)
  if mode == "text-to-video":
    return item
  item = dataclasses.replace(item, video=media("video"))
  if mode == "extend":
    if not _positive_int(row["extend"]) or row["extend"] > MAX_FRAMES:
      raise Problem(f'{name}: "extend" must be a number of frames in [1, {MAX_FRAMES}], got {row["extend"]!r}')
    return dataclasses.replace(item, extend=row["extend"])      # frames = the clip's length + extend, once probed
  if mode == "restyle":
    s = row["strength"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
      raise Problem(f'{name}: "strength" must be a number in [0, 1] (0 keeps the video, 1 ignores it), got {s!r}')
    return dataclasses.replace(item, strength=float(s), frames=T, given=T)
  mask = row["mask"]
  if isinstance(mask, str):
    return dataclasses.replace(item, mask_image=_path(mask, "mask", name, base), frames=T, given=T)
  return dataclasses.replace(item, boxes=_boxes(mask, name, cfg), frames=T, given=T)


def _positive_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _path(value, key: str, name: str, base: str) -> str:
  if not isinstance(value, str) or not value:
    raise Problem(f'{name}: "{key}" must be a file path')
  return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _boxes(value, name: str, cfg: ml_collections.ConfigDict) -> tuple[tuple[int, ...], ...]:
  """[[x0, y0, x1, y1(, f0, f1)], ...] -> ((x0, y0, x1, y1, f0, f1), ...), checked against the frame."""
  v = cfg.video
  usage = (f'"mask" must be an image path or a list of boxes [x0, y0, x1, y1] or [x0, y0, x1, y1, f0, f1] '
           f"within the {v.width}x{v.height} frame and frames [0, {v.frames}]")
  if not isinstance(value, list) or not value:
    raise Problem(f"{name}: {usage}")
  out = []
  for box in value:
    if (not isinstance(box, list) or len(box) not in (4, 6)
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in box)):
      raise Problem(f"{name}: box {box!r}: {usage}")
    x0, y0, x1, y1, f0, f1 = box if len(box) == 6 else (*box, 0, v.frames)
    if not (0 <= x0 < x1 <= v.width and 0 <= y0 < y1 <= v.height and 0 <= f0 < f1 <= v.frames):
      raise Problem(f"{name}: box {box!r}: {usage}")
    out.append((x0, y0, x1, y1, f0, f1))
  return tuple(out)


def _check_media(item: Item, cfg: ml_collections.ConfigDict) -> Item | Problem:
  """Probes the item's media files: readable, of a supported kind, long enough for the mode;
  a mask image of the right size. Returns the item with `given`/`frames` set from the clip, or
  the Problem."""
  name, v = f"item {item.id!r}", cfg.video
  try:
    if item.image:
      entry = Entry(item.image, "")
      if not entry.is_image:
        raise Problem(f'{name}: "image" {item.image} is not an image file (png, jpg, ...)')
      video_files.probe(entry)
    if item.video:
      entry = Entry(item.video, "")
      if entry.is_image:
        raise Problem(f'{name}: "video" {item.video} is an image; use "image" for image-to-video')
      meta = video_files.probe(entry)
      available = video_files.available_frames(entry, meta, v.fps)
      if available < max(item.given, 1):
        raise Problem(f"{name}: {item.video} has {available} frames at video.fps={v.fps}; {item.mode} needs "
                      f"at least {max(item.given, 1)}")
      if item.mode == "extend":
        if available + item.extend > MAX_FRAMES:
          raise Problem(f"{name}: {item.video} has {available} frames at video.fps={v.fps}; with \"extend\": "
                        f"{item.extend} the video would pass {MAX_FRAMES} frames")
        item = dataclasses.replace(item, given=available, frames=available + item.extend)
      if item.mask_image:
        _check_mask(item.mask_image, (meta.width, meta.height), (v.width, v.height), name)
  except video_files.BadFile as e:
    path = item.image or item.video
    return Problem(f"{name}: {path}: {e}")
  except Problem as e:
    return e
  return item


def _check_mask(path: str, video_size: tuple[int, int], model_size: tuple[int, int], name: str) -> None:
  if not os.path.isfile(path):
    raise Problem(f"{name}: mask {path} not found")
  try:
    with Image.open(path) as image:
      size = image.size
  except (OSError, ValueError, Image.DecompressionBombError):
    raise Problem(f"{name}: mask {path} is not a readable image") from None
  if size not in (video_size, model_size):
    raise Problem(f"{name}: mask {path} is {size[0]}x{size[1]}; it must be the video's size "
                  f"{video_size[0]}x{video_size[1]} or the model's {model_size[0]}x{model_size[1]}")
