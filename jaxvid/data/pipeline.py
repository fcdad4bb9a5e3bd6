"""The input pipeline: a grain dataset per process, ending in globally sharded batches.

  batch source (random access: element j is this process's block of global batch j,
                a pure function of (seed, j))
      synthetic  moving shapes rendered at video.*                  {"video", "tokens", "skipped"}
      files      a manifest of video/image files, bucketed by shape  {"video", "tokens", "skipped"}
      latents    a latent store written by `jaxvid encode`           {"latents", "tokens", "skipped"}
    -> iterator (grain: worker processes and prefetch from config.data; its state is checkpointed)
    -> jax.make_array_from_process_local_data     global arrays sharded over the batch axes

Each process loads its own contiguous block of every global batch, so the global batch is the
same examples in the same order for any process count. Videos travel as uint8 (4x less host
traffic) and are scaled to the model's range on device by the autoencoder. "skipped" counts,
per slot, the unreadable files that were replaced to fill it.
"""

import dataclasses
import logging

import grain
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from jaxvid import config as config_lib
from jaxvid.data import buckets as bucket_lib
from jaxvid.data import latents as latents_lib
from jaxvid.data import synthetic
from jaxvid.data import video_files
from jaxvid.errors import UserError
from jaxvid.models import text
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding

log = logging.getLogger("jaxvid")


@dataclasses.dataclass(frozen=True)
class SyntheticBatches:
  """Global batch j is synthetic examples [j * B, (j + 1) * B); this process renders its block.

  batches[j] -> {"video": uint8 [b, T, H, W, 3], "tokens": int32 [b, L], "skipped": int32 [b]}.
  """
  source: synthetic.MovingShapes
  tokenizer: text.Tokenizer
  batch: int
  process_index: int = 0
  process_count: int = 1

  def __len__(self) -> int:
    return len(self.source) // self.batch

  def __getitem__(self, j: int) -> dict:
    block = bucket_lib.process_block(self.batch, self.process_index, self.process_count)
    examples = [self.source[int(j) * self.batch + i] for i in range(block.start, block.stop)]
    return {"video": np.stack([e["video"] for e in examples]),
            "tokens": self.tokenizer([e["caption"] for e in examples]),
            "skipped": np.zeros(len(examples), np.int32)}


def video_spec(batch: int, frames: int, height: int, width: int, channels: int, max_len: int) -> dict:
  return {"video": jax.ShapeDtypeStruct((batch, frames, height, width, channels), jnp.uint8),
          "tokens": jax.ShapeDtypeStruct((batch, max_len), jnp.int32),
          "skipped": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def batch_spec(cfg: ml_collections.ConfigDict) -> dict:
  """Shapes and dtypes of a global batch of the video.* shape (the synthetic source's)."""
  v = cfg.video
  return video_spec(cfg.train.batch_size, v.frames, v.height, v.width, v.channels, cfg.text.max_len)


@dataclasses.dataclass
class Source:
  """What make_source returns: the batch source, the global batch spec of each bucket it
  yields (each compiles once), and how many manifest entries were dropped at startup."""
  batches: object
  specs: list[dict]
  skipped_at_start: int = 0


def make_source(cfg: ml_collections.ConfigDict, process_index: int, process_count: int,
                batch_shards: int = 1) -> Source:
  """The batch source of `data.source` for this process; `batch_shards` is mesh.data * mesh.fsdp."""
  if cfg.data.source == "synthetic":
    if cfg.train.batch_size % process_count:
      raise UserError(f"train.batch_size={cfg.train.batch_size} must divide over {process_count} processes")
    v = cfg.video
    source = synthetic.MovingShapes(seed=cfg.seed, frames=v.frames, height=v.height, width=v.width,
                                    split=cfg.data.split)
    batches = SyntheticBatches(source, text.make_tokenizer(cfg), cfg.train.batch_size, process_index, process_count)
    return Source(batches, [batch_spec(cfg)])
  shards = int(np.lcm(batch_shards, process_count))
  if cfg.data.source == "latents":
    batches, specs = latents_lib.open_batches(cfg, shards, process_index, process_count)
    return Source(batches, specs)
  if cfg.video.channels != 3:
    raise UserError(f"data.source='files' gives RGB videos; set --config.video.channels=3 "
                    f"(it is {cfg.video.channels})")
  buckets = [bucket_lib.Bucket(*b) for b in config_lib.buckets(cfg, shards)]
  clips, skipped = video_files.load_clips(cfg.data.manifest, buckets, cfg.data.fps, cfg.data.stride,
                                          cfg.data.probe_threads, progress=process_index == 0)
  plan = bucket_lib.BatchPlan([c.bucket for c in clips], [b.batch for b in buckets], cfg.seed)
  counts = [len(m) for m in plan.members]
  log.info("%d clips in %s (%d skipped): %s", len(clips), cfg.data.manifest, skipped,
           ", ".join(f"{b.name} x{n} (batch {b.batch})" for b, n in zip(buckets, counts) if n))
  batches = video_files.FileBatches(clips, buckets, plan, text.make_tokenizer(cfg), cfg.seed,
                                    cfg.data.crop == "random", process_index, process_count)
  specs = [video_spec(b.batch, *b.shape, 3, cfg.text.max_len) for b, n in zip(buckets, counts) if n]
  return Source(batches, specs, skipped)


def make_dataset(batches, cfg: ml_collections.ConfigDict) -> grain.IterDataset:
  """The grain iterator dataset over a batch source, with workers and prefetch from config.data."""
  it = grain.MapDataset.source(batches).to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.data.threads, prefetch_buffer_size=cfg.data.prefetch))
  if cfg.data.workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.workers))
  return it


class Loader:
  """Iterates global batches (see the module docstring for the keys), sharded over the mesh.

  `iterator` is the grain iterator whose state a checkpoint saves and restores; `specs` are the
  global batch shapes it can yield, one per bucket; `skipped_at_start` counts manifest entries
  dropped before training (missing, unreadable or too short files).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    source = make_source(cfg, jax.process_index(), jax.process_count(), shards)
    self.specs, self.skipped_at_start = source.specs, source.skipped_at_start
    self.iterator = iter(make_dataset(source.batches, cfg))
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
