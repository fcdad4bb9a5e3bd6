"""The VAE's numbers beside training: held-out PSNR and SSIM, and the latent statistics.

Held-out set: `vae.eval_clips` clips of the video.* shape, fixed for the run: with the synthetic
source, clips of the combinations training never shows (synthetic split "heldout"); with files,
the first clips of `vae.eval_manifest` (center crop), if given. Reconstructions go through the
posterior mean with the EMA parameters (what an export and `autoencoder.checkpoint` use), are
rounded to uint8 like a saved video, and compared with the originals: PSNR (peak 255) and SSIM
per clip, averaged (train/video_quality.py). Logged as eval/psnr, eval/ssim.

Latent statistics: the per-channel mean and standard deviation of the posterior means of the
first `vae.stats_clips` training clips (the start of the run's own data stream), for the EMA
parameters of a step; written as LATENT_STATS beside the checkpoints at the end of training and
into exports, and used by `autoencoder.name=vae` to normalize latents for the diffusion model.
"""

import logging
import math
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from jaxvid.data import buckets as bucket_lib
from jaxvid.data import pipeline
from jaxvid.data import synthetic
from jaxvid.data import video_files
from jaxvid.errors import UserError
from jaxvid.models import autoencoder
from jaxvid.models import vae as vae_lib
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.train import video_quality

log = logging.getLogger("jaxvid")


def heldout_clips(cfg: ml_collections.ConfigDict) -> np.ndarray | None:
  """uint8 [N, T, H, W, 3] held-out clips of the video.* shape, or None if there is no held-out set."""
  v, n = cfg.video, cfg.vae.eval_clips
  if n == 0:
    return None
  if cfg.vae.eval_manifest:
    bucket = bucket_lib.Bucket(v.frames, v.height, v.width, 1)
    clips, _ = video_files.load_clips(cfg.vae.eval_manifest, [bucket], cfg.data.fps, cfg.data.stride,
                                      cfg.data.probe_threads, progress=False)
    videos = []
    for c in clips:
      try:
        videos.append(video_files.decode(c.entry, c.meta, v.frames, v.height, v.width, c.rate))
      except video_files.BadFile as e:
        video_files.report_skip(c.entry.key, str(e))
      if len(videos) == n:
        break
    return np.stack(videos) if videos else None
  if cfg.data.source != "synthetic":
    return None
  source = synthetic.MovingShapes(seed=cfg.seed, frames=v.frames, height=v.height, width=v.width, split="heldout")
  return np.stack([source[i]["video"] for i in range(n)])


def reconstruct(model, video: jax.Array) -> jax.Array:
  """uint8 [B, T, H, W, 3] -> its reconstruction through the posterior mean, uint8."""
  mean, _ = model.encode(autoencoder.normalize(video))
  return autoencoder.denormalize(model.decode(mean))


class Evaluator:
  """evaluate(state) -> {"eval/psnr", "eval/ssim"} on the held-out clips; `every` steps."""

  def __init__(self, cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh, rules: sharding.Rules,
               clips: np.ndarray):
    self.every = cfg.vae.eval_every or cfg.train.steps
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch = -(-cfg.train.batch_size // shards) * shards
    pad = -len(clips) % self.batch
    self.count = len(clips)
    self.clips = np.concatenate([clips, np.repeat(clips[-1:], pad, 0)]) if pad else clips
    self.sharding = mesh_lib.batch_sharding(mesh, rules, 5)
    self.valid_sharding = mesh_lib.batch_sharding(mesh, rules, 1)
    self.valid = (np.arange(len(self.clips)) < self.count).astype(np.float32)

    def scores(params, video, valid):   # sums over the batch: replicated, readable on every process
      with sharding.activation_rules(mesh, rules):
        recon = reconstruct(nnx.merge(graphdef, params), video)
        psnr = video_quality.psnr(recon, video, 255.0)
        ssim = video_quality.ssim(recon / 255.0, video / 255.0)
        return jnp.sum(psnr * valid), jnp.sum(ssim * valid)

    self._scores = jax.jit(scores, out_shardings=mesh_lib.replicated(mesh))

  def __call__(self, state) -> dict:
    psnr = ssim = 0.0
    for start in range(0, len(self.clips), self.batch):
      part = slice(start, start + self.batch)
      video = jax.make_array_from_callback(self.clips[part].shape, self.sharding,
                                           lambda idx, part=part: self.clips[part][idx])
      valid = jax.make_array_from_callback(self.valid[part].shape, self.valid_sharding,
                                           lambda idx, part=part: self.valid[part][idx])
      p, s = jax.device_get(self._scores(state.ema, video, valid))
      psnr, ssim = psnr + float(p), ssim + float(s)
    return {"eval/psnr": psnr / self.count, "eval/ssim": ssim / self.count}


def make_evaluator(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                   rules: sharding.Rules) -> Evaluator | None:
  clips = heldout_clips(cfg)
  if clips is None:
    log.info("no held-out set (data.source=%s, vae.eval_clips=%d, vae.eval_manifest=%r): no eval/psnr, eval/ssim",
             cfg.data.source, cfg.vae.eval_clips, cfg.vae.eval_manifest)
    return None
  return Evaluator(cfg, graphdef, mesh, rules, clips)


def latent_statistics(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params, mesh: Mesh,
                      rules: sharding.Rules) -> tuple[np.ndarray, np.ndarray, int]:
  """(mean [Z], std [Z], clips): per-channel statistics of the posterior means of the first
  `vae.stats_clips` (or a few more, whole batches) clips of the training stream."""
  source = pipeline.make_source(cfg, jax.process_index(), jax.process_count(),
                                mesh.shape["data"] * mesh.shape["fsdp"])

  @jax.jit   # sums over the batch: replicated, readable on every process
  def moments(params, video):
    with sharding.activation_rules(mesh, rules):
      mean, _ = nnx.merge(graphdef, params).encode(autoencoder.normalize(video))
    flat = mean.reshape(-1, mean.shape[-1])
    return jax.lax.with_sharding_constraint((jnp.sum(flat, 0), jnp.sum(jnp.square(flat), 0)),
                                            mesh_lib.replicated(mesh))

  total, total_sq, count, clips, j = 0.0, 0.0, 0, 0, 0
  while clips < cfg.vae.stats_clips:
    local = np.asarray(source.batches[j]["video"])
    video = jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, rules, 5), local)
    s, sq = jax.device_get(moments(params, video))
    total, total_sq = total + s.astype(np.float64), total_sq + sq.astype(np.float64)
    count += video.shape[0] * math.prod(vae_lib.latent_shape(cfg.vae, *video.shape[1:4])[:3])   # latent positions
    clips, j = clips + video.shape[0], j + 1
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
  return mean.astype(np.float32), std.astype(np.float32), clips


def _has_latent_stats(directory: str, step: int) -> bool:
  try:
    autoencoder.read_latent_stats(directory, step)
  except UserError:
    return False
  return True


def write_latent_statistics(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params, step: int,
                            directory: str, mesh: Mesh, rules: sharding.Rules, source: str | None = None) -> None:
  """Computes the latent statistics of `params` (the EMA parameters of `step`) and writes them
  into `directory` (a run directory or an export being written). Where the run `source` already
  has them for `step`, they are copied instead: recomputed they differ in the last bits, and
  `autoencoder.VAE.identity` (what a latent run and a latent store record) would then tell the
  export from its run."""
  if source and _has_latent_stats(source, step):
    if jax.process_index() == 0:
      shutil.copyfile(os.path.join(source, autoencoder.LATENT_STATS), os.path.join(directory, autoencoder.LATENT_STATS))
    log.info("latent statistics of step %d: copied from %s", step, source)
    return
  mean, std, clips = latent_statistics(cfg, graphdef, params, mesh, rules)
  if jax.process_index() == 0:
    autoencoder.write_latent_stats(directory, step, clips, mean, std)
  log.info("latent statistics of step %d over %d clips: mean %s, std %s", step, clips,
           np.array2string(mean, precision=2), np.array2string(std, precision=2))
