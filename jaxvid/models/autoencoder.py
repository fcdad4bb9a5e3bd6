"""The map between pixel videos and the model's latent space.

`identity` is pixel space: a latent is the video scaled to [-1, 1]. A trained video
autoencoder implements the same three methods (latent_shape, encode, decode), and the latent
cache (`jaxvid encode`), the train step and the sampler go through them unchanged.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections


def normalize(video: jax.Array) -> jax.Array:
  """uint8 [..., C] in 0..255 -> float32 in [-1, 1] (the model's range)."""
  return video.astype(jnp.float32) / 127.5 - 1.0


def denormalize(x: jax.Array) -> jax.Array:
  """float [..., C] in [-1, 1] -> uint8 in 0..255 (clipped)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class Identity:
  """Pixel space: latents are videos scaled to [-1, 1]."""
  name: str = "identity"

  def latent_shape(self, frames: int, height: int, width: int, channels: int = 3) -> tuple[int, int, int, int]:
    """(T, H, W, C) of the latents of a (frames, height, width, channels) video."""
    return (frames, height, width, channels)

  def encode(self, video: jax.Array) -> jax.Array:
    """uint8 [B, T, H, W, C] -> float32 latents [B, T', H', W', C']."""
    return normalize(video)

  def decode(self, latents: jax.Array) -> jax.Array:
    """float latents [B, T', H', W', C'] -> float video [B, T, H, W, C] in [-1, 1]."""
    return latents


def make(cfg: ml_collections.ConfigDict) -> Identity:
  """The autoencoder named by `autoencoder.name`."""
  if cfg.autoencoder.name == "identity":
    return Identity()
  raise ValueError(f"unknown autoencoder {cfg.autoencoder.name!r}")
