"""The map between pixel videos and the model's latent space.

An autoencoder has a name and four methods; the latent cache (`jaxvid encode`), the train step
and the sampler use only these, so a trained video autoencoder plugs in beside `identity`:

  params = ae.load(mesh)                         its parameters, placed on `mesh` (a pytree;
                                                 passed to jitted functions as an argument,
                                                 never closed over, so it is not baked into
                                                 the compiled program)
  ae.latent_shape(T, H, W, C) -> (T', H', W', C')
  ae.encode(params, video uint8 [B, T, H, W, C]) -> float32 latents [B, T', H', W', C']
  ae.decode(params, latents [B, T', H', W', C']) -> float32 video [B, T, H, W, C] in [-1, 1]
  ae.latent_mask(mask [B, T, H, W, 1]) -> [B, T', H', W', 1]   a pixel mask in latent resolution

`identity` is pixel space: a latent is the video scaled to [-1, 1]. `vae` is a causal video VAE
trained by jaxvid (`jaxvid train --config configs/vae.py`), read from `autoencoder.checkpoint` (its
run directory or export): latents are its posterior means, normalized per channel with the
statistics stored beside its parameters (LATENT_STATS), encoded and decoded in the temporal chunks
and spatial tiles of `autoencoder.{chunk,tile,tile_overlap}` (models/vae_tiling.py).
"""

import dataclasses
import hashlib
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from jaxvid import config as config_lib
from jaxvid.errors import UserError
from jaxvid.models import vae as vae_lib
from jaxvid.models import vae_tiling

# Per-channel latent statistics of a VAE, next to its checkpoints or in its export:
# {"step": int, "clips": int, "mean": [Z], "std": [Z]} (what `encode` subtracts and divides by).
LATENT_STATS = "latent_stats.json"


def normalize(video: jax.Array) -> jax.Array:
  """uint8 [..., C] in 0..255 -> float32 in [-1, 1] (the model's range)."""
  return video.astype(jnp.float32) / 127.5 - 1.0


def denormalize(x: jax.Array) -> jax.Array:
  """float [..., C] in [-1, 1] -> uint8 in 0..255 (clipped)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Identity:
  """Pixel space: latents are videos scaled to [-1, 1]; no parameters."""
  name: str = "identity"

  def load(self, mesh: Mesh | None = None) -> dict:
    """The parameters, placed on `mesh`: none."""
    del mesh
    return {}

  def latent_shape(self, frames: int, height: int, width: int, channels: int = 3) -> tuple[int, int, int, int]:
    """(T, H, W, C) of the latents of a (frames, height, width, channels) video."""
    return (frames, height, width, channels)

  def encode(self, params: dict, video: jax.Array) -> jax.Array:
    """uint8 [B, T, H, W, C] -> float32 latents [B, T', H', W', C']."""
    del params
    return normalize(video)

  def decode(self, params: dict, latents: jax.Array) -> jax.Array:
    """float latents [B, T', H', W', C'] -> float video [B, T, H, W, C] in [-1, 1]."""
    del params
    return latents.astype(jnp.float32)

  def latent_mask(self, mask: jax.Array) -> jax.Array:
    """A pixel mask [B, T, H, W, 1] in latent resolution [B, T', H', W', 1]: the same."""
    return mask

  def identity(self) -> str:
    """What fixes the latents (see VAE.identity)."""
    return "identity"


def write_latent_stats(directory: str, step: int, clips: int, mean: np.ndarray, std: np.ndarray) -> None:
  """Writes LATENT_STATS for the parameters of `step` into `directory` (atomically)."""
  path = os.path.join(directory, LATENT_STATS)
  with open(path + ".tmp", "w") as f:
    json.dump({"step": int(step), "clips": int(clips), "mean": [float(x) for x in mean],
               "std": [float(x) for x in std]}, f, indent=1)
  os.replace(path + ".tmp", path)


def read_latent_stats(directory: str, step: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean [Z], std [Z]) stored in `directory` for the parameters of `step`."""
  path = os.path.join(directory, LATENT_STATS)
  stats = None
  if os.path.isfile(path):
    with open(path) as f:
      stats = json.load(f)
  if stats is None or stats.get("step") != step:
    found = f"it has them for step {stats['step']}" if stats else f"no {LATENT_STATS}"
    raise UserError(f"{directory}: no latent statistics for its step {step} ({found}); write them with "
                    f"jaxvid export --workdir {directory} --output EXPORT, then set "
                    "--config.autoencoder.checkpoint=EXPORT")
  return np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class VAE:
  """A causal video VAE trained by jaxvid. Params: {"encoder", "decoder": nnx.State of EMA
  parameters, "mean", "std": [Z] latent statistics}, replicated over the mesh."""
  checkpoint: str                          # run directory or export of the VAE
  run_config: ml_collections.ConfigDict    # the VAE run's config (its architecture is run_config.vae)
  plan: vae_tiling.Plan                    # chunks and tiles
  encoder_def: nnx.GraphDef
  decoder_def: nnx.GraphDef
  name: str = "vae"

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "VAE":
    """The VAE of `autoencoder.checkpoint`; its latent geometry must be the one `cfg` declares."""
    a = cfg.autoencoder
    path = os.path.join(a.checkpoint, "config.json")
    if not os.path.isfile(path):
      raise UserError(f"autoencoder.checkpoint={a.checkpoint}: no config.json; give the run directory or export "
                      "of a VAE (jaxvid train --config configs/vae.py)")
    with open(path) as f:
      run_config = config_lib.from_json(f.read())
    if run_config.model.name != "vae":
      raise UserError(f"autoencoder.checkpoint={a.checkpoint} holds a {run_config.model.name!r} model, not a VAE")
    v = run_config.vae
    for key in ("latent_channels", "temporal_compression", "spatial_compression"):
      if v[key] != a[key]:
        raise UserError(f"the VAE in {a.checkpoint} has {key}={v[key]}, the config autoencoder.{key}={a[key]}; "
                        f"set --config.autoencoder.{key}={v[key]}")
    if vae_lib.trained_on_images(run_config) and not vae_lib.trained_on_images(cfg):
      raise UserError(f"the VAE in {a.checkpoint} was trained on images only (video.frames=1), so its temporal "
                      f"layers are untrained; train it on clips first: jaxvid train --config CONFIG --workdir DIR "
                      f"--init_from {a.checkpoint} (e.g. CONFIG configs/vae.py:S_from_images)")
    model = nnx.eval_shape(lambda: vae_lib.build(run_config))
    plan = vae_tiling.Plan(tc=v.temporal_compression, sc=v.spatial_compression, chunk=a.chunk, tile=a.tile,
                           overlap=a.tile_overlap)
    return cls(a.checkpoint, run_config, plan, nnx.graphdef(model.encoder), nnx.graphdef(model.decoder))

  def identity(self) -> str:
    """What fixes the latents: the architecture, and the step and values of the latent
    statistics (written for one step's parameters). A latent cache records it."""
    path = os.path.join(self.checkpoint, LATENT_STATS)
    stats = open(path).read() if os.path.isfile(path) else ""
    return f"vae {config_lib.model_hash(self.run_config)} {hashlib.sha256(stats.encode()).hexdigest()[:12]}"

  def load(self, mesh: Mesh | None = None) -> dict:
    """The EMA parameters of the checkpoint's latest step (or the export) and their latent
    statistics, replicated over `mesh` (default: the first device)."""
    from jaxvid.train import export as export_lib   # restoring a run's parameters is the trainer's job
    from jaxvid.train import state as state_lib
    sharding = NamedSharding(mesh, P()) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, abstract = state_lib.abstract_model(self.run_config)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    params, step = export_lib.load_params(self.checkpoint, self.run_config, target, which="ema")
    mean, std = read_latent_stats(self.checkpoint, step)
    return {"encoder": params["encoder"], "decoder": params["decoder"],
            "mean": jax.device_put(mean, sharding), "std": jax.device_put(std, sharding)}

  def latent_shape(self, frames: int, height: int, width: int, channels: int = 3) -> tuple[int, int, int, int]:
    """(1 + (T - 1) / tc, H / sc, W / sc, Z) of a (frames, height, width, 3) video."""
    del channels
    return vae_lib.latent_shape(self.run_config.vae, frames, height, width)

  def encode(self, params: dict, video: jax.Array) -> jax.Array:
    """uint8 [B, T, H, W, 3] -> normalized posterior means float32 [B, T', H', W', Z]."""
    encoder = nnx.merge(self.encoder_def, params["encoder"])
    mean, _ = vae_lib.split_moments(vae_tiling.encode(encoder, normalize(video), self.plan))
    return (mean - params["mean"]) / params["std"]

  def decode(self, params: dict, latents: jax.Array) -> jax.Array:
    """normalized latents [B, T', H', W', Z] -> float32 video [B, T, H, W, 3] in [-1, 1]."""
    decoder = nnx.merge(self.decoder_def, params["decoder"])
    z = latents.astype(jnp.float32) * params["std"] + params["mean"]
    return jnp.clip(vae_tiling.decode(decoder, z, self.plan), -1.0, 1.0)

  def latent_mask(self, mask: jax.Array) -> jax.Array:
    """A known-pixel mask [B, T, H, W, 1] in latent resolution [B, T', H', W', 1]: a latent cell is
    known only if every pixel it covers is (frame 0 alone, then tc frames, sc x sc pixels per cell),
    so a cell that mixes known and unknown pixels is generated, not copied."""
    tc, sc = self.plan.tc, self.plan.sc
    b, t, h, w, c = mask.shape
    rest = mask[:, 1:].reshape(b, (t - 1) // tc, tc, h, w, c).min(axis=2)
    cells = jnp.concatenate([mask[:, :1], rest], axis=1)
    return cells.reshape(b, cells.shape[1], h // sc, sc, w // sc, sc, c).min(axis=(3, 5))


# A diffusion run's record of the autoencoder it is trained in, beside its config.json:
# {"checkpoint": absolute path, "identity": VAE.identity()}. Resuming and sampling check it.
RECORD = "autoencoder.json"


def record(ae: "Identity | VAE", workdir: str) -> None:
  """Writes RECORD into `workdir` (a VAE only; call on one process)."""
  if ae.name != "vae":
    return
  path = os.path.join(workdir, RECORD)
  with open(path + ".tmp", "w") as f:
    json.dump({"checkpoint": os.path.abspath(ae.checkpoint), "identity": ae.identity()}, f, indent=1)
  os.replace(path + ".tmp", path)


def check_record(ae: "Identity | VAE", workdir: str) -> None:
  """Raises UserError if `workdir` was trained in the latents of another VAE than `ae` (its
  weights or latent statistics changed since, or another checkpoint). No RECORD: nothing to check."""
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    return
  with open(path) as f:
    saved = json.load(f)
  if saved["identity"] != ae.identity():
    raise UserError(f"{workdir} was trained in the latents of the VAE {saved['identity']!r} at {saved['checkpoint']}, "
                    f"but autoencoder.checkpoint={getattr(ae, 'checkpoint', '')} holds {ae.identity()!r} (trained "
                    "further, or another VAE); set --config.autoencoder.checkpoint to an export of the VAE the run "
                    "was trained with, or train in a new --workdir")


def make(cfg: ml_collections.ConfigDict) -> Identity | VAE:
  """The autoencoder named by `autoencoder.name`."""
  if cfg.autoencoder.name == "identity":
    return Identity()
  if cfg.autoencoder.name == "vae":
    return VAE.from_config(cfg)
  raise ValueError(f"unknown autoencoder {cfg.autoencoder.name!r}")
