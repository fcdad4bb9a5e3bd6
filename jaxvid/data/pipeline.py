"""The input pipeline: a grain dataset per process, ending in globally sharded batches.

  source (random access, deterministic by (seed, index))
    -> this process's shard: its contiguous block of every global batch (`ProcessShard`), so
       the global batch is the same examples in the same order for any process count
    -> map: tokenize the caption                  {"video": uint8 [T, H, W, C], "tokens": int32 [L]}
    -> batch of the per-process batch size
    -> iterator (worker processes and prefetch from config.data)
    -> jax.make_array_from_process_local_data     global arrays sharded over the batch axes

Videos travel as uint8 (4x less host traffic) and are scaled to the model's range on device
with `normalize`.
"""

import dataclasses

import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from jaxvid.data import synthetic
from jaxvid.models import text
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding


def normalize(video: jax.Array) -> jax.Array:
  """uint8 [..., C] in 0..255 -> float32 in [-1, 1] (the model's range)."""
  return video.astype(jnp.float32) / 127.5 - 1.0


def denormalize(x: jax.Array) -> jax.Array:
  """float [..., C] in [-1, 1] -> uint8 in 0..255 (clipped)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Tokenize:
  """{"video", "caption"} -> {"video", "tokens" int32 [L]} (picklable for worker processes)."""
  tokenizer: text.Tokenizer

  def __call__(self, example: dict) -> dict:
    return {"video": example["video"], "tokens": self.tokenizer([example["caption"]])[0]}


def make_source(cfg: ml_collections.ConfigDict):
  v = cfg.video
  return synthetic.MovingShapes(seed=cfg.seed, frames=v.frames, height=v.height, width=v.width,
                                split=cfg.data.split)


@dataclasses.dataclass(frozen=True)
class ProcessShard:
  """Random access to process `index` of `count`'s examples: in the global batch j of size
  `batch`, the block [j * batch + index * batch / count, ... + batch / count)."""
  source: object
  index: int
  count: int
  batch: int

  def __len__(self) -> int:
    return len(self.source) // self.batch * (self.batch // self.count)

  def __getitem__(self, i: int):
    local = self.batch // self.count
    return self.source[(i // local) * self.batch + self.index * local + i % local]


def make_dataset(cfg: ml_collections.ConfigDict, process_index: int, process_count: int) -> grain.IterDataset:
  """This process's stream of batches of train.batch_size / process_count examples."""
  if cfg.train.batch_size % process_count:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide over {process_count} processes")
  ds = grain.MapDataset.source(ProcessShard(make_source(cfg), process_index, process_count, cfg.train.batch_size))
  ds = ds.map(Tokenize(text.make_tokenizer(cfg)))
  ds = ds.batch(cfg.train.batch_size // process_count, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=cfg.data.prefetch))
  if cfg.data.workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.workers))
  return it


class Loader:
  """Iterates global batches {"video": uint8 [B, T, H, W, C], "tokens": int32 [B, L]}.

  `iterator` is the grain iterator whose state a checkpoint saves and restores.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules):
    self.iterator = iter(make_dataset(cfg, jax.process_index(), jax.process_count()))
    self.mesh, self.rules = mesh, rules

  def shardings(self, batch_spec: dict) -> dict:
    return {k: mesh_lib.batch_sharding(self.mesh, self.rules, len(v.shape)) for k, v in batch_spec.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    local = next(self.iterator)
    return {k: jax.make_array_from_process_local_data(
                mesh_lib.batch_sharding(self.mesh, self.rules, v.ndim), np.asarray(v))
            for k, v in local.items()}


def batch_spec(cfg: ml_collections.ConfigDict) -> dict:
  """Shapes and dtypes of a global batch, for compiling before the first batch arrives."""
  v, b = cfg.video, cfg.train.batch_size
  return {"video": jax.ShapeDtypeStruct((b, v.frames, v.height, v.width, v.channels), jnp.uint8),
          "tokens": jax.ShapeDtypeStruct((b, cfg.text.max_len), jnp.int32)}
