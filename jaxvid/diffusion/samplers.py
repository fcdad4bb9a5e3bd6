"""Samplers for flow models, with classifier-free guidance.

A sampler is a small frozen dataclass; `sample` runs its loop with `lax.fori_loop`, so the
whole trajectory compiles once.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxvid.diffusion import flow as flow_lib


@dataclasses.dataclass(frozen=True)
class Euler:
  """First-order Euler steps on dx/dt = v over the shifted schedule."""
  steps: int

  def sample(self, velocity_fn, noise: jax.Array, flow: flow_lib.Flow) -> jax.Array:
    """velocity_fn(x [B, ...], t [B]) -> v [B, ...]; noise [B, ...] at t = 1 -> x0 [B, ...] at t = 0."""
    ts = flow.schedule(self.steps)

    def step(i, x):
      t, t_next = ts[i], ts[i + 1]
      v = velocity_fn(x, jnp.full((x.shape[0],), t))
      return x + (t_next - t) * v

    return jax.lax.fori_loop(0, self.steps, step, noise)


def guided(velocity_fn, cond: tuple, uncond: tuple, scale: float):
  """Classifier-free guidance: one batched pass over [cond; uncond].

  velocity_fn(x, t, text_emb, text_mask) -> v; cond/uncond = (text_emb [B, L, W], mask [B, L]).
  Returns v_u + scale (v_c - v_u) as a function of (x [B, ...], t [B]).
  """
  text_emb = jnp.concatenate([cond[0], uncond[0]], axis=0)
  text_mask = jnp.concatenate([cond[1], uncond[1]], axis=0)

  def fn(x, t):
    v = velocity_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), text_emb, text_mask)
    v_cond, v_uncond = jnp.split(v, 2, axis=0)
    return v_uncond + scale * (v_cond - v_uncond)

  return fn
