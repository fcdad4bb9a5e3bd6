"""Rectified flow (flow matching with a straight path), velocity prediction.

Convention (as in SD3 / Wan): x_t = (1 - t) x_0 + t eps, with t = 0 data and t = 1 noise; the
model predicts v = eps - x_0, and sampling integrates dx/dt = v from t = 1 down to 0.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from jaxvid import config as config_lib
from jaxvid.diffusion import conditioning
from jaxvid.models import layers


@dataclasses.dataclass(frozen=True)
class Flow:
  timestep: str = "logit_normal"  # or "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  shift: float = 1.0              # t -> shift t / (1 + (shift - 1) t); > 1 spends more time near noise

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, tokens: int | None = None) -> "Flow":
    """The flow of `cfg` for clips of `tokens` patches (default: the video.* shape's)."""
    f = cfg.flow
    return cls(timestep=f.timestep, logit_mean=f.logit_mean, logit_std=f.logit_std,
               shift=resolve_shift(cfg, tokens))

  def shift_t(self, t: jax.Array) -> jax.Array:
    return self.shift * t / (1 + (self.shift - 1) * t)

  def sample_t(self, rng: jax.Array, batch: int) -> jax.Array:
    """Training times [B] in (0, 1), shifted."""
    if self.timestep == "logit_normal":
      t = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, (batch,)))
    else:
      t = jax.random.uniform(rng, (batch,))
    return self.shift_t(t)

  def unshift_t(self, t: jax.Array) -> jax.Array:
    """The inverse of `shift_t`."""
    return t / (self.shift - (self.shift - 1) * t)

  def schedule(self, steps: int, start: jax.Array | None = None) -> jax.Array:
    """Sampling times [steps + 1] from 1 to 0, shifted like training; with `start` [B] in
    [0, 1], per-item times [B, steps + 1] from start to 0 (the part of the shifted schedule
    below start, in `steps` equal steps before the shift)."""
    u = jnp.linspace(1.0, 0.0, steps + 1)
    if start is not None:
      u = self.unshift_t(jnp.asarray(start, jnp.float32))[:, None] * u
    return self.shift_t(u)


def resolve_shift(cfg: ml_collections.ConfigDict, tokens: int | None = None) -> float:
  """`flow.shift` if set, else exp(mu) with mu linear in the token count (Flux/SD3 style);
  `tokens` defaults to the video.* shape's."""
  f = cfg.flow
  if f.shift > 0:
    return float(f.shift)
  n = config_lib.num_tokens(cfg) if tokens is None else tokens
  slope = (f.shift_max - f.shift_base) / (f.shift_max_tokens - f.shift_base_tokens)
  return math.exp(f.shift_base + slope * (n - f.shift_base_tokens))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t for x0, noise [B, ...] and t [B]."""
  t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1 - t) * x0 + t * noise


def loss(velocity_fn, x0: jax.Array, rng: jax.Array, flow: Flow, known_mask: jax.Array | None = None) -> jax.Array:
  """Mean squared velocity error. velocity_fn(x_t [B, ...], t [B]) -> v [B, ...]; x0 [B, ...].

  known_mask [B, ..., 1] (optional): 1 where x0 is given to the model clean (conditioning.apply);
  the error is averaged over the other elements only.
  """
  rng_t, rng_noise = jax.random.split(rng)
  t = flow.sample_t(rng_t, x0.shape[0])
  noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
  x_t = interpolate(x0, noise, t)
  if known_mask is None:
    return layers.mean(jnp.square(velocity_fn(x_t, t).astype(jnp.float32) - (noise - x0)))
  v = velocity_fn(conditioning.apply(x_t, x0, known_mask), t)
  weight = 1.0 - known_mask
  error = layers.mean(weight * jnp.square(v.astype(jnp.float32) - (noise - x0))) * x0.size
  return error / jnp.maximum(jnp.sum(weight) * x0.shape[-1], 1.0)
