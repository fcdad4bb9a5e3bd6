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

`identity` is pixel space: a latent is the video scaled to [-1, 1].
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections


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


def make(cfg: ml_collections.ConfigDict) -> Identity:
  """The autoencoder named by `autoencoder.name`."""
  if cfg.autoencoder.name == "identity":
    return Identity()
  raise ValueError(f"unknown autoencoder {cfg.autoencoder.name!r}")
