"""Moving shapes: a synthetic text-to-video dataset that needs no files.

Each clip shows one solid shape (circle, square, triangle or diamond) in one of
six saturated colors, moving in a straight line (left, right, up or down) over
an achromatic background (plain gray, plain black, checkered or striped). The
caption names all four: "a red circle moving left on a gray background".

Everything is a pure function of (seed, index): the dataset is infinite, random
access and the same on every host. A fixed eighth of the 6 * 4 * 4 * 4 = 384
attribute combinations is held out of training (`is_heldout`), so evaluation
can prompt for compositions the model never saw, made only of values it did.

`detect` inverts `render` from pixels alone (color by hue, direction by the
motion of the colored pixels) so that generated videos can be scored against
their prompts.
"""

import dataclasses
import itertools
import zlib

import numpy as np

# Hues 0, 60, ..., 300 degrees at full saturation.
COLORS = {
    "red": (255, 0, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "magenta": (255, 0, 255),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# (dx, dy) in image coordinates: x grows to the right, y grows downwards.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Gray levels only (R = G = B), so saturation alone separates the shape.
BACKGROUNDS = ("gray", "black", "checkered", "striped")
SPLITS = ("train", "heldout", "all")

# Geometry, as fractions of the frame (see `Scene`).
SIZE_RANGE = (0.18, 0.28)
TRAVEL_RANGE = (0.35, 0.55)
_MARGIN = 0.03  # Smallest gap between the shape and the frame edge.

# Combinations are (color, shape, direction, background) tuples.
_ALL_COMBOS = tuple(
    itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS))
# The held-out eighth: lowest CRC-32 of the spelled-out combination. CRC-32 is
# stable across processes and Python versions (unlike `hash`), and this order
# is also the pseudo-random order in which `heldout_scenes` cycles through them.
_BY_CRC = sorted(_ALL_COMBOS, key=lambda c: zlib.crc32(" ".join(c).encode()))
_HELDOUT_COMBOS = tuple(_BY_CRC[:len(_ALL_COMBOS) // 8])
_HELDOUT_SET = frozenset(_HELDOUT_COMBOS)
_TRAIN_COMBOS = tuple(c for c in _ALL_COMBOS if c not in _HELDOUT_SET)
_SPLIT_COMBOS = {
    "train": _TRAIN_COMBOS, "heldout": _HELDOUT_COMBOS, "all": _ALL_COMBOS}

# `detect`: a pixel is foreground when its saturation (max - min over RGB),
# averaged over its 3x3 neighborhood to calm noise, is at least half the
# frame's 99th percentile and at least _MIN_SATURATION; a frame counts when at
# least _MIN_FRACTION of its pixels are foreground.
_MIN_SATURATION = 80.0
_MIN_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class Scene:
  """One clip's content; `render` turns it into pixels at any size and length.

  Attributes:
    shape: one of SHAPES.
    color: one of COLORS.
    direction: one of DIRECTIONS.
    background: one of BACKGROUNDS.
    x: center in the first frame, as a fraction of the width.
    y: center in the first frame, as a fraction of the height.
    size: radius (half-side for the square) as a fraction of min(height,
      width).
    travel: total displacement from the first to the last frame, as a fraction
      of the width (left/right) or the height (up/down). The clip's frames
      split it evenly, so the shape stays inside for any clip length.
  """
  shape: str
  color: str
  direction: str
  background: str
  x: float
  y: float
  size: float
  travel: float

  def __post_init__(self):
    for value, allowed in ((self.shape, SHAPES), (self.color, COLORS),
                           (self.direction, DIRECTIONS),
                           (self.background, BACKGROUNDS)):
      if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")

  @property
  def caption(self) -> str:
    return (f"a {self.color} {self.shape} moving {self.direction} "
            f"on a {self.background} background")

  def centers(self, frames: int) -> np.ndarray:
    """Shape center in each frame: float [frames, 2] as (x, y) fractions."""
    dx, dy = DIRECTIONS[self.direction]
    t = np.arange(frames) / max(frames - 1, 1)  # 0 -> 1 over the clip.
    return np.stack(
        [self.x + dx * self.travel * t, self.y + dy * self.travel * t], axis=-1)


def is_heldout(color: str, shape: str, direction: str, background: str) -> bool:
  """Whether this combination belongs to the fixed held-out eighth."""
  return (color, shape, direction, background) in _HELDOUT_SET


def _sample_scene(rng: np.random.Generator, combo: tuple[str, ...]) -> Scene:
  """Draws size, travel and start so the shape stays inside the frame."""
  color, shape, direction, background = combo
  size = rng.uniform(*SIZE_RANGE)
  lo, hi = size + _MARGIN, 1.0 - size - _MARGIN  # Allowed range of the center.
  travel = rng.uniform(TRAVEL_RANGE[0], min(TRAVEL_RANGE[1], hi - lo))
  along = rng.uniform(lo, hi - travel)  # Start along the motion axis.
  across = rng.uniform(lo, hi)
  dx, dy = DIRECTIONS[direction]
  if dx + dy < 0:  # Moving toward 0: mirror, so start + motion stays in range.
    along = 1.0 - along
  x, y = (along, across) if dx else (across, along)
  return Scene(shape=shape, color=color, direction=direction,
               background=background, x=float(x), y=float(y), size=float(size),
               travel=float(travel))


def make_scene(seed: int, index: int, split: str = "train") -> Scene:
  """The scene at `index` of the stream `seed`, drawn from `split`'s combos.

  Args:
    seed: non-negative stream seed.
    index: non-negative position in the stream.
    split: "train" (not held out), "heldout" (only held out) or "all".

  Returns:
    A Scene that depends only on (seed, index, split).
  """
  if split not in _SPLIT_COMBOS:
    raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
  combos = _SPLIT_COMBOS[split]
  rng = np.random.default_rng([seed, index])
  return _sample_scene(rng, combos[rng.integers(len(combos))])


def heldout_scenes(n: int, seed: int) -> list[Scene]:
  """`n` evaluation scenes, cycling through every held-out combo in turn.

  Scene i uses held-out combo i mod 48, with its geometry drawn from (seed, i).
  """
  return [
      _sample_scene(np.random.default_rng([seed, i]),
                    _HELDOUT_COMBOS[i % len(_HELDOUT_COMBOS)])
      for i in range(n)
  ]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray,
                r: float) -> np.ndarray:
  """Pixels inside `shape` given their offsets dx, dy from its center.

  Args:
    shape: one of SHAPES.
    dx: float [T, 1, W], pixel x minus center x, in pixels.
    dy: float [T, H, 1], pixel y minus center y, in pixels.
    r: radius in pixels; every shape fits in the 2r x 2r box.

  Returns:
    bool [T, H, W].
  """
  if shape == "circle":
    return dx**2 + dy**2 <= r**2
  if shape == "square":
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  if shape == "triangle":  # Apex up at dy = -r, base along dy = r.
    return (dy <= r) & (2 * np.abs(dx) <= dy + r)
  raise ValueError(f"unknown shape {shape!r}")


def _background(name: str, height: int, width: int) -> np.ndarray:
  """Static achromatic background: uint8 [height, width, 3], R = G = B."""
  i = np.arange(height)[:, None]
  j = np.arange(width)[None, :]
  cell = max(1, round(min(height, width) / 8))
  if name == "gray":
    level = np.full((height, width), 128)
  elif name == "black":
    level = np.zeros((height, width))
  elif name == "checkered":
    level = np.where((i // cell + j // cell) % 2 == 0, 96, 160)
  elif name == "striped":  # Diagonal stripes.
    level = np.where((i + j) // cell % 2 == 0, 64, 192)
  else:
    raise ValueError(f"unknown background {name!r}")
  return np.repeat(level.astype(np.uint8)[..., None], 3, axis=-1)


def render(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
  """Draws `scene` as a clip: uint8 [frames, height, width, 3].

  The shape is solid with sharp (aliased) edges; its center moves linearly
  from (scene.x, scene.y) in frame 0 to start + travel in the last frame.
  """
  if min(frames, height, width) < 1:
    raise ValueError(f"cannot render {frames}x{height}x{width}")
  centers = scene.centers(frames)  # [T, 2]
  # Offsets of pixel centers from the shape center, in pixels.
  dx = (np.arange(width) + 0.5)[None, None, :] - width * centers[:, 0, None, None]
  dy = (np.arange(height) + 0.5)[None, :, None] - height * centers[:, 1, None, None]
  mask = _shape_mask(scene.shape, dx, dy, scene.size * min(height, width))
  color = np.array(COLORS[scene.color], np.uint8)
  background = _background(scene.background, height, width)
  return np.where(mask[..., None], color, background[None])


class MovingShapes:
  """Random-access source for grain.MapDataset.source.

  len() is 2**31 - 1 (effectively infinite). Item i is
  {"video": uint8 [frames, height, width, 3], "caption": str}, rendered from
  make_scene(seed, i, split). Holds only plain values, so it pickles.
  """

  def __init__(self, seed: int, frames: int, height: int, width: int,
               split: str = "train"):
    if split not in _SPLIT_COMBOS:
      raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    self.seed = seed
    self.frames = frames
    self.height = height
    self.width = width
    self.split = split

  def __len__(self) -> int:
    return 2**31 - 1

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range")
    scene = make_scene(self.seed, index, self.split)
    return {
        "video": render(scene, self.frames, self.height, self.width),
        "caption": scene.caption,
    }

  def __repr__(self) -> str:
    return (f"MovingShapes(seed={self.seed}, frames={self.frames}, "
            f"height={self.height}, width={self.width}, split={self.split!r})")


def _hue(rgb) -> float:
  """Hue in degrees [0, 360) of one RGB triple (any scale)."""
  r, g, b = (float(v) for v in rgb)
  hi, lo = max(r, g, b), min(r, g, b)
  chroma = hi - lo
  if chroma == 0:
    return 0.0
  if hi == r:
    sector = ((g - b) / chroma) % 6
  elif hi == g:
    sector = (b - r) / chroma + 2
  else:
    sector = (r - g) / chroma + 4
  return 60.0 * sector


def _box_blur(x: np.ndarray) -> np.ndarray:
  """Mean over each pixel's 3x3 neighborhood (edges repeated): [T, H, W]."""
  _, h, w = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
  return sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def detect(video: np.ndarray) -> tuple[str, str]:
  """Reads (color, direction) back from a clip, e.g. a generated one.

  Foreground is the clearly saturated pixels of each frame (gray levels,
  whatever their texture, have none); the color is the palette entry nearest
  in hue to their mean color, and the direction is the sign of the larger
  component of their centroid's velocity (least squares over the frames that
  have foreground, in fractions of the frame).

  Args:
    video: uint8 [T, H, W, 3]; may be noisy or blurry.

  Returns:
    (color name, direction name). ("none", "none") when no frame has a
    foreground; direction "none" when fewer than two frames do or the
    centroid does not move.
  """
  video = np.asarray(video, np.float32)
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"expected [T, H, W, 3], got shape {video.shape}")
  t, h, w, _ = video.shape
  saturation = _box_blur(video.max(-1) - video.min(-1))  # [T, H, W]
  reference = np.percentile(saturation.reshape(t, -1), 99, axis=1)  # [T]
  threshold = np.maximum(0.5 * reference, _MIN_SATURATION)
  foreground = saturation >= threshold[:, None, None]  # [T, H, W]
  counts = foreground.sum((1, 2))  # [T]
  valid = counts >= max(1, _MIN_FRACTION * h * w)  # [T]
  if not valid.any():
    return "none", "none"

  mean_rgb = video[foreground & valid[:, None, None]].mean(0)
  hue = _hue(mean_rgb)
  distance = {name: abs((hue - _hue(rgb) + 180) % 360 - 180)
              for name, rgb in COLORS.items()}
  color = min(distance, key=distance.get)

  frame_ids = np.flatnonzero(valid)
  if len(frame_ids) < 2:
    return color, "none"
  fg = foreground[frame_ids]
  n = counts[frame_ids]
  cx = (fg * (np.arange(w) + 0.5)).sum((1, 2)) / n / w  # [T'] fraction
  cy = (fg * (np.arange(h) + 0.5)[:, None]).sum((1, 2)) / n / h  # [T']
  vx = np.polyfit(frame_ids, cx, 1)[0]
  vy = np.polyfit(frame_ids, cy, 1)[0]
  if vx == 0 and vy == 0:
    return color, "none"
  step = (int(np.sign(vx)), 0) if abs(vx) >= abs(vy) else (0, int(np.sign(vy)))
  direction = {v: k for k, v in DIRECTIONS.items()}[step]
  return color, direction
