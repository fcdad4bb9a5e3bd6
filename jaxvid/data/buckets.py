"""Bucketing clips by shape, and the deterministic order of global batches.

Every global batch holds clips of one bucket (frames, height, width), so each batch has a
static shape and each bucket compiles once. A clip goes to the bucket whose aspect ratio is
closest to its own, and among those to the longest that its length allows (images go to
one-frame buckets).

`BatchPlan` fixes, for a seed, which clips form global batch j: every epoch each bucket's
clips are shuffled and cut into batches of that bucket's size (the last one wrapped around,
so every clip is seen every epoch), and the batches of all buckets are shuffled together.
It is a pure function of (seed, j): the same on every host, for any number of processes or
workers, and after a restart.
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Bucket:
  """A clip shape and its global batch size."""
  frames: int
  height: int
  width: int
  batch: int

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.frames, self.height, self.width)

  @property
  def name(self) -> str:
    return f"{self.frames}x{self.height}x{self.width}"


def assign(height: int, width: int, frames_available: int, is_image: bool, buckets: list[Bucket]) -> int | None:
  """The index of the bucket that fits a clip best, or None if none fits.

  height, width: the clip's frame size; frames_available: how many frames it has at the
  sampling rate. Images go to one-frame buckets; videos to the multi-frame buckets they are
  long enough for (to one-frame buckets only if there is no multi-frame bucket at all).
  Closest aspect ratio first (in log space), then the most frames, then the most pixels.
  """
  multi = any(b.frames > 1 for b in buckets)
  best, best_score = None, None
  for i, b in enumerate(buckets):
    if is_image and b.frames != 1:
      continue
    if not is_image and (b.frames > frames_available or (multi and b.frames == 1)):
      continue
    score = (round(abs(math.log((height / width) / (b.height / b.width))), 6), -b.frames, -b.height * b.width)
    if best_score is None or score < best_score:
      best, best_score = i, score
  return best


class BatchPlan:
  """Which items form each global batch. Items are 0..N-1; `bucket_of[i]` is item i's bucket.

  plan[j] -> (bucket index, item ids int64 [bucket batch]).
  """

  def __init__(self, bucket_of, batch_sizes: tuple[int, ...], seed: int):
    of = np.asarray(bucket_of, np.int64)
    if not of.size:
      raise ValueError("a batch plan needs at least one item")
    self.batch_sizes, self.seed = tuple(batch_sizes), seed
    self.members = tuple(np.flatnonzero(of == b) for b in range(len(self.batch_sizes)))   # item ids per bucket
    self.batches_per_epoch = sum(math.ceil(len(m) / size) for m, size in zip(self.members, self.batch_sizes))
    self._cache = (None, None)

  def __len__(self) -> int:
    # Effectively endless: a run asks for steps, not epochs.
    return self.batches_per_epoch * 1_000_000

  def __getitem__(self, j: int) -> tuple[int, np.ndarray]:
    epoch, index = divmod(int(j), self.batches_per_epoch)
    if self._cache[0] != epoch:
      self._cache = (epoch, self._epoch(epoch))
    return self._cache[1][index]

  def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for b, (members, size) in enumerate(zip(self.members, self.batch_sizes)):
      if not len(members):
        continue
      order = rng.permutation(members)
      count = math.ceil(len(order) / size)
      order = np.resize(order, count * size)   # wraps around to fill the last batch
      batches += [(b, order[k * size:(k + 1) * size]) for k in range(count)]
    return [batches[k] for k in rng.permutation(len(batches))]


def process_block(batch: int, process_index: int, process_count: int) -> slice:
  """The contiguous block of a global batch of `batch` that process `process_index` loads."""
  if batch % process_count:
    raise ValueError(f"a global batch of {batch} does not split over {process_count} processes")
  local = batch // process_count
  return slice(process_index * local, (process_index + 1) * local)
