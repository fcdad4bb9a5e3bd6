"""Reading video and image files: probing what a file holds, and decoding a clip from it.

Videos go through the ffmpeg binary that ships with imageio-ffmpeg, which does the heavy work
in its own process: seeking to the clip's start, resampling to the target frame rate, scaling
so the frame covers the target size and cropping. Python only receives the final
uint8 [T, H, W, 3] frames, so a 1080p source costs no more host memory than a 256x256 one.
Images (png, jpg, ...) are read with Pillow and are one-frame clips.

Every failure of a file (missing, empty, not a video, truncated, too short) raises
`BadFile` with a one-line reason; the pipeline skips the file and counts it.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os

import imageio_ffmpeg
import numpy as np
from PIL import Image
import tqdm

from jaxvid.data import buckets as bucket_lib
from jaxvid.data import manifest as manifest_lib
from jaxvid.data.manifest import Entry
from jaxvid.errors import UserError
from jaxvid.parallel import distributed

log = logging.getLogger("jaxvid")

# imageio-ffmpeg logs a warning whenever the output size differs from the source's: always, here.
logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)


class BadFile(Exception):
  """A file that cannot give the clip asked for; the message says why, in a few words."""


@dataclasses.dataclass(frozen=True)
class Meta:
  """What a file holds: frame size in pixels, and for videos the length and native frame rate."""
  width: int
  height: int
  duration: float = 0.0      # seconds; 0 for images
  fps: float = 0.0           # native frame rate; 0 for images


def probe(entry: Entry) -> Meta:
  """Reads the header of `entry.path` (or takes width/height/duration from the manifest).

  Raises BadFile if the file is missing, empty or not a readable video or image.
  """
  if entry.width and entry.height and (entry.is_image or entry.duration):
    return Meta(entry.width, entry.height, 0.0 if entry.is_image else entry.duration, 0.0)
  _check_exists(entry.path)
  if entry.is_image:
    try:
      with Image.open(entry.path) as image:
        width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise BadFile(f"not a readable image ({type(e).__name__})") from None
    return Meta(width, height)
  try:
    frames = imageio_ffmpeg.read_frames(entry.path)
    info = next(frames)
    frames.close()
  except (OSError, RuntimeError, StopIteration) as e:
    raise BadFile(f"not a readable video ({type(e).__name__})") from None
  width, height = info.get("source_size") or info.get("size") or (0, 0)
  duration, fps = float(info.get("duration") or 0.0), float(info.get("fps") or 0.0)
  if not width or not height or duration <= 0 or fps <= 0:
    raise BadFile("video has no frame size, duration or frame rate")
  return Meta(width, height, duration, fps)


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise BadFile("file not found")
  if os.path.getsize(path) == 0:
    raise BadFile("empty file")


def sample_fps(entry: Entry, meta: Meta, fps: float, stride: int) -> float:
  """The rate clip frames are taken at: the entry's own fps, else `fps`, else native / stride."""
  if entry.fps > 0:
    return entry.fps
  if fps > 0:
    return fps
  return meta.fps / max(stride, 1)


def available_frames(entry: Entry, meta: Meta, rate: float) -> int:
  """How many frames at `rate` fit in the entry's window (1 for an image)."""
  if entry.is_image:
    return 1
  end = min(entry.end, meta.duration) if entry.end else meta.duration
  return max(0, math.floor((end - entry.start) * rate + 1e-6))


def decode(entry: Entry, meta: Meta, frames: int, height: int, width: int, rate: float,
           offset: float = 0.5, crop: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
  """Decodes `frames` frames at `rate` fps from the entry's window, scaled to cover
  (height, width) and cropped to it. Returns uint8 [frames, height, width, 3].

  offset in [0, 1]: where the clip starts within the slack of the window (0: at its start,
  1: ending at its end); crop (x, y) in [0, 1]: where the crop sits in the scaled frame
  (0.5, 0.5 is a center crop). Raises BadFile if fewer frames than asked come out.
  """
  _check_exists(entry.path)
  if entry.is_image:
    if frames != 1:
      raise BadFile(f"an image is one frame, {frames} were asked for")
    return decode_image(entry.path, height, width, crop)[None]
  slack = available_frames(entry, meta, rate) - frames
  if slack < 0:
    raise BadFile(f"too short: {available_frames(entry, meta, rate)} frames at {rate:g} fps, {frames} needed")
  start = entry.start + offset * slack / rate
  scale = f"scale={width}:{height}:force_original_aspect_ratio=increase:flags=bicubic"
  crop_filter = f"crop={width}:{height}:(iw-ow)*{crop[0]:.6f}:(ih-oh)*{crop[1]:.6f}"
  try:
    reader = imageio_ffmpeg.read_frames(
        entry.path, input_params=["-ss", f"{start:.6f}"],
        output_params=["-frames:v", str(frames), "-vf", f"fps={rate:g},{scale},{crop_filter}"])
    next(reader)  # meta information
    out = [np.frombuffer(buffer, np.uint8) for buffer in reader]
  except (OSError, RuntimeError, StopIteration) as e:
    raise BadFile(f"cannot be decoded ({type(e).__name__})") from None
  if len(out) < frames:
    raise BadFile(f"truncated or unreadable: {len(out)} of {frames} frames decoded")
  return np.stack(out[:frames]).reshape(frames, height, width, 3)


def eight_bit(image: Image.Image) -> Image.Image:
  """`image` with 16-bit grayscale (PNG's I;16, or I as Pillow reads some) scaled to 8 bits,
  which Pillow's convert("RGB") / convert("L") would clip to white instead; other modes as they are."""
  if image.mode.startswith("I;16") or image.mode == "I":
    gray = np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L")
  return image


def decode_image(path: str, height: int, width: int, crop: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
  """An image scaled to cover (height, width) and cropped: uint8 [height, width, 3]."""
  try:
    with Image.open(path) as image:
      image = eight_bit(image).convert("RGB")
      scale = max(height / image.height, width / image.width)
      size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
      image = image.resize(size, Image.Resampling.BICUBIC)
      x = round((size[0] - width) * crop[0])
      y = round((size[1] - height) * crop[1])
      return np.asarray(image.crop((x, y, x + width, y + height)), np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadFile(f"not a readable image ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------
# A dataset of files: probe every entry once, bucket it, then load batches with skip-and-refill.

MAX_REFILLS = 64          # unreadable picks in a row for one slot before the job gives up
_reported: set[str] = set()   # files already logged as skipped, per process


@dataclasses.dataclass(frozen=True)
class Clip:
  """A usable entry: its file's meta, the frame rate it is sampled at, and its bucket."""
  entry: Entry
  meta: Meta
  rate: float
  bucket: int


def report_skip(key: str, reason: str) -> None:
  """Logs a skipped file once per process."""
  if key not in _reported:
    _reported.add(key)
    log.warning("skipping %s: %s", key, reason)


def load_clips(manifest_path: str, buckets: list, fps: float, stride: int, threads: int,
               progress: bool = True) -> tuple[list[Clip], int]:
  """The usable clips of a manifest, the same on every process: `index_clips` of its entries.

  Raises UserError (on every process, so none waits in a collective) if the manifest cannot be
  read or has no usable clip on some process, or if the processes see different clips.
  """
  error, clips, skipped = None, [], 0
  try:   # may fail on some hosts only (a manifest or files they cannot read): fail on all together
    entries = manifest_lib.read(manifest_path)
    clips, skipped = index_clips(entries, buckets, fps, stride, threads, progress)
    if not clips:
      raise UserError(f"manifest {manifest_path} has no usable clip: all {len(entries)} entries were "
                      "skipped (the log says why)")
  except UserError as e:
    error = e
  distributed.fail_together(error)
  # Every process must see the same clips in the same buckets, or their batches would not line up.
  distributed.check_same(clips_digest(clips), f"see other usable clips in {manifest_path} than process 0 "
                         "(files that some hosts cannot read, or a manifest that differs); make the same "
                         "files readable on every host")
  return clips, skipped


def clips_digest(clips: list[Clip]) -> str:
  """Hex digest of which clips there are, with their captions, buckets and sampling rates."""
  h = hashlib.sha256()
  for c in clips:
    h.update(json.dumps([c.entry.key, c.entry.caption, c.bucket, round(c.rate, 6)]).encode())
  return h.hexdigest()


def index_clips(entries: list[Entry], buckets: list, fps: float, stride: int, threads: int = 16,
                progress: bool = True) -> tuple[list[Clip], int]:
  """Probes every entry (in `threads` threads) and assigns it a bucket.

  Returns (usable clips in manifest order, number of entries skipped). Files that are missing,
  unreadable, too short for every bucket or of a shape no bucket takes are logged and skipped.
  """
  def one(entry: Entry) -> Clip | str:
    try:
      meta = probe(entry)
      rate = sample_fps(entry, meta, fps, stride)
      if rate <= 0 and not entry.is_image:
        # Sizes from the manifest, but neither data.fps nor the row's fps: the file's own rate is needed.
        meta = probe(dataclasses.replace(entry, duration=0.0))
        rate = sample_fps(entry, meta, fps, stride)
    except BadFile as e:
      return str(e)
    frames = available_frames(entry, meta, rate)
    bucket = bucket_lib.assign(meta.height, meta.width, frames, entry.is_image, buckets)
    if bucket is None:
      if entry.is_image:
        return "an image, and data.buckets has no one-frame bucket"
      return f"too short: {frames} frames at {rate:g} fps, no bucket fits"
    return Clip(entry, meta, rate, bucket)

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    results = list(tqdm.tqdm(pool.map(one, entries), total=len(entries), desc="probe", unit="file",
                             disable=not progress or len(entries) < 100, dynamic_ncols=True))
  clips, skipped = [], 0
  for entry, result in zip(entries, results):
    if isinstance(result, Clip):
      clips.append(result)
    else:
      skipped += 1
      report_skip(entry.key, result)
  return clips, skipped


@dataclasses.dataclass
class FileBatches:
  """Random access to this process's part of each global batch, decoded from files.

  batches[j] -> {"video": uint8 [b, T, H, W, 3], "tokens": int32 [b, L], "skipped": int32 [b]}
  where b is this process's block of bucket batch size. A file that fails to decode is
  replaced by another clip of the same bucket, picked from (seed, j, slot, attempt), and
  counted in "skipped" of its slot; so the result is still a pure function of (seed, j).
  """
  clips: list[Clip]
  buckets: list
  plan: bucket_lib.BatchPlan
  tokenizer: object
  seed: int
  random_crop: bool
  process_index: int = 0
  process_count: int = 1

  def __len__(self) -> int:
    return len(self.plan)

  def __getitem__(self, j: int) -> dict:
    b, items = self.plan[j]
    bucket = self.buckets[b]
    block = bucket_lib.process_block(bucket.batch, self.process_index, self.process_count)
    videos, captions = [], []
    skipped = np.zeros(block.stop - block.start, np.int32)
    for k, (slot, item) in enumerate(zip(range(block.start, block.stop), items[block])):
      for attempt in range(MAX_REFILLS + 1):
        rng = np.random.default_rng([self.seed, int(j), slot, attempt])
        offset, x, y = rng.random(3) if self.random_crop else (0.5, 0.5, 0.5)
        clip = self.clips[item]
        try:
          videos.append(decode(clip.entry, clip.meta, bucket.frames, bucket.height, bucket.width, clip.rate,
                               offset, (x, y)))
          captions.append(clip.entry.caption)
          break
        except BadFile as e:   # (not remembered: a retry at another offset may work, and resume must match)
          report_skip(clip.entry.key, str(e))
          skipped[k] += 1
          members = self.plan.members[b]
          item = members[rng.integers(len(members))]
      else:
        raise UserError(f"bucket {bucket.name}: {MAX_REFILLS} unreadable clips in a row (files gone since "
                        "startup?); check the files of the manifest (the log names them)")
    return {"video": np.stack(videos), "tokens": self.tokenizer(captions), "skipped": skipped}
