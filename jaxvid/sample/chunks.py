"""The chunks an item is sampled in, their inputs, and the video they add up to.

The model makes clips of T = video.frames frames. An item is sampled in one or more chunks of
T frames, each given as (known uint8 [T, H, W, 3], mask uint8 [T, H, W, 1], strength): mask 1
marks the frames or pixels given clean, strength is the noise level t the chunk starts from.

  text-to-video   nothing known; longer than T, it continues as below
  image-to-video  the image is frame 0 of the first chunk, then as below
  extend          every chunk is given the last K frames of the video so far (K =
                  sample.context_frames, default T / 2; all of them if there are fewer, through
                  a VAE their last whole latent frames) and
                  adds T - K new ones, until the video has its length
  inpaint         the video's first T frames, known outside the mask's region
  restyle         the video's first T frames, noised to t = strength; nothing known

`Work` holds one item's progress on the process that samples it.
"""

import ml_collections
import numpy as np
from PIL import Image

from jaxvid import config as config_lib
from jaxvid.data import video_files
from jaxvid.data.manifest import Entry
from jaxvid.sample.items import Item


def context_frames(cfg: ml_collections.ConfigDict) -> int:
  """K: frames of the video so far given to each continuing chunk (at least 1 when a clip has 2).

  Through a causal VAE of temporal compression tc, K is 1 + tc k (whole latent frames; default
  about half of them), so the context is exactly the first latent frames of the chunk.
  """
  frames = cfg.video.frames
  if frames < 2:
    return 0
  if cfg.sample.context_frames:                       # validated by config.validate
    return cfg.sample.context_frames
  compression = config_lib.clip_compression(cfg)
  if compression:                                      # half the latent frames after the first
    return 1 + compression[0] * ((frames - 1) // compression[0] // 2)
  return max(1, frames // 2)


def temporal_compression(cfg: ml_collections.ConfigDict) -> int:
  """tc of the causal VAE the model works through (1 in pixel space)."""
  compression = config_lib.clip_compression(cfg)
  return compression[0] if compression else 1


def chunks_of(item: Item, cfg: ml_collections.ConfigDict) -> int:
  """Chunks that make `item` with the model of `cfg` (see chunk_count)."""
  return chunk_count(item, cfg.video.frames, context_frames(cfg), temporal_compression(cfg))


def given_frames(length: int, context: int, tc: int = 1) -> int:
  """Frames of a video of `length` given to its next chunk: the last `context`, or through a
  causal VAE of temporal compression `tc` the last whole latent frames (1 + tc k) of a shorter one."""
  if length >= context:
    return context
  return 1 + tc * ((length - 1) // tc) if length else 0


def chunk_count(item: Item, frames: int, context: int, tc: int = 1) -> int:
  """Chunks of `frames` frames that make `item`, continuing with `context` known frames."""
  if item.mode in ("inpaint", "restyle"):
    return 1
  n, chunks = item.given, 0
  if n == 0:
    n, chunks = frames, 1
  if n < item.frames and n < context:      # a clip shorter than the context: all given (see given_frames)
    n, chunks = n + frames - given_frames(n, context, tc), chunks + 1
  if n < item.frames:                      # then T - K new frames a chunk
    chunks += -(-(item.frames - n) // (frames - context))
  return chunks


class Work:
  """One item's chunks: `inputs(c)` for chunk c, then `add(c, frames)` with what it made.

  Media files are decoded at the first `inputs` call; a file that fails then raises
  video_files.BadFile.
  """

  def __init__(self, item: Item, cfg: ml_collections.ConfigDict):
    v = cfg.video
    self.item, self.fps = item, v.fps
    self.shape = (v.frames, v.height, v.width)
    self.context, self.tc = context_frames(cfg), temporal_compression(cfg)
    self.chunks = chunks_of(item, cfg)
    self._parts: list[np.ndarray] = []       # uint8 [n_i, H, W, 3]: the video so far, in pieces
    self._length = 0
    self._region: np.ndarray | None = None   # inpaint: bool [T, H, W], True where regenerated
    self._given = 0                          # frames given to the last chunk
    self.added = 0                           # chunks done

  @property
  def finished(self) -> bool:
    return self.added == self.chunks

  @property
  def video(self) -> np.ndarray:
    """uint8 [frames, H, W, 3]: the video (so far)."""
    return np.concatenate(self._parts)[:self.item.frames]

  def inputs(self, chunk: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(known uint8 [T, H, W, 3], mask uint8 [T, H, W, 1], strength) of chunk `chunk`."""
    assert chunk == self.added, (chunk, self.added)
    if chunk == 0:
      self._load()
    t, h, w = self.shape
    known = np.zeros((t, h, w, 3), np.uint8)
    mask = np.zeros((t, h, w, 1), np.uint8)
    mode = self.item.mode
    if mode == "restyle":
      return self._parts[0][:t], mask, self.item.strength
    if mode == "inpaint":
      mask[..., 0] = ~self._region
      return self._parts[0][:t], mask, 1.0
    self._given = given_frames(self._length, self.context, self.tc)
    if self._given:
      known[:self._given] = self._last(self._given)
      mask[:self._given] = 1
    return known, mask, 1.0

  def add(self, chunk: int, frames: np.ndarray) -> None:
    """Takes the uint8 [T, H, W, 3] frames chunk `chunk` made."""
    assert chunk == self.added, (chunk, self.added)
    if self.item.mode == "inpaint":   # the part outside the region as given (through a VAE too)
      self._parts = [np.where(self._region[..., None], frames, self._parts[0][:len(frames)])]
    elif self.item.mode == "restyle":
      self._parts = [frames]
    else:
      self._parts.append(frames[self._given:])
    self._length = sum(len(p) for p in self._parts)
    self.added += 1

  def _last(self, n: int) -> np.ndarray:
    """The last n frames of the video so far."""
    out, need = [], n
    for part in reversed(self._parts):
      out.append(part[max(0, len(part) - need):])
      need -= len(out[-1])
      if need == 0:
        break
    return np.concatenate(out[::-1])

  def _load(self) -> None:
    """Decodes the item's image or clip (and mask) at the model's frame size and rate."""
    item, (_, h, w) = self.item, self.shape
    if item.image:
      self._parts = [video_files.decode_image(item.image, h, w)[None]]
    elif item.video:
      entry = Entry(item.video, "")
      meta = video_files.probe(entry)
      self._parts = [video_files.decode(entry, meta, item.given, h, w, self.fps, offset=0.0)]
    self._length = sum(len(p) for p in self._parts)
    if item.mode == "inpaint":
      self._region = region(item, self.shape)


def region(item: Item, shape: tuple[int, int, int]) -> np.ndarray:
  """bool [T, H, W]: where an inpaint item is regenerated (its mask image or boxes)."""
  t, h, w = shape
  out = np.zeros(shape, bool)
  if item.mask_image:
    with Image.open(item.mask_image) as image:
      gray = video_files.eight_bit(image).convert("L")
      if gray.size != (w, h):    # the video's size: scaled and cropped like the video
        scale = max(h / gray.height, w / gray.width)
        size = (max(w, round(gray.width * scale)), max(h, round(gray.height * scale)))
        gray = gray.resize(size, Image.Resampling.BILINEAR)
        x, y = round((size[0] - w) * 0.5), round((size[1] - h) * 0.5)
        gray = gray.crop((x, y, x + w, y + h))
      out[:] = np.asarray(gray) >= 128
  for x0, y0, x1, y1, f0, f1 in item.boxes:
    out[f0:f1, y0:y1, x0:x1] = True
  return out
