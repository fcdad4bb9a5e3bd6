"""Samplers for flow models, and classifier-free guidance.

A sampler is a small frozen dataclass with `sample(velocity_fn, x, ts)`: it integrates
dx/dt = v(x, t) from x at ts[:, 0] down the per-item time grid ts [B, S + 1] (usually to 0)
with `lax.fori_loop`, so the whole trajectory compiles once. Per-item grids let one batch hold
items that start at different noise levels (video-to-video at several strengths).

  euler    first order, one model evaluation per step
  heun     second order (explicit trapezoid), two evaluations per step
  dpm++2m  DPM-Solver++(2M): second order multistep in the data prediction
           x0 = x - t v, one evaluation per step (Lu et al. 2022, with alpha = 1 - t, sigma = t)

Orders are checked in tests/diffusion/test_samplers.py on a Gaussian data distribution, whose
exact flow is known in closed form.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxvid.config import SAMPLERS


def _per_item(a: jax.Array, ndim: int) -> jax.Array:
  """[B] -> [B, 1, ...] to broadcast against an x of `ndim` dimensions."""
  return a.reshape(a.shape + (1,) * (ndim - 1))


@dataclasses.dataclass(frozen=True)
class Euler:
  """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)."""
  steps: int

  def sample(self, velocity_fn, x: jax.Array, ts: jax.Array) -> jax.Array:
    """velocity_fn(x [B, ...], t [B]) -> v [B, ...]; x [B, ...] at ts[:, 0]; ts [B, steps + 1]."""
    def step(i, x):
      t, t_next = ts[:, i], ts[:, i + 1]
      return x + _per_item(t_next - t, x.ndim) * velocity_fn(x, t)

    return jax.lax.fori_loop(0, self.steps, step, x)


@dataclasses.dataclass(frozen=True)
class Heun:
  """Heun's method: an Euler predictor, then the average of the slopes at both ends."""
  steps: int

  def sample(self, velocity_fn, x: jax.Array, ts: jax.Array) -> jax.Array:
    """As `Euler.sample`."""
    def step(i, x):
      t, t_next = ts[:, i], ts[:, i + 1]
      dt = _per_item(t_next - t, x.ndim)
      v = velocity_fn(x, t)
      v_next = velocity_fn(x + dt * v, t_next)
      return x + dt * 0.5 * (v + v_next)

    return jax.lax.fori_loop(0, self.steps, step, x)


@dataclasses.dataclass(frozen=True)
class DPMSolver2M:
  """DPM-Solver++(2M) for rectified flow (alpha_t = 1 - t, sigma_t = t, lambda = log(alpha / sigma)).

  With the data prediction D_i = x_i - t_i v(x_i, t_i) and h_i = lambda_{i+1} - lambda_i:
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + (alpha_{i+1} - alpha_i sigma_{i+1} / sigma_i) D'
    D' = D_i + (h_i / (2 h_{i-1})) (D_i - D_{i-1})       (first order, D' = D_i, where h_{i-1}
                                                           or h_i is infinite: at t = 1 and t = 0)
  Written with ratios so t = 1 (alpha = 0) and t = 0 (sigma = 0) stay finite.
  """
  steps: int

  def sample(self, velocity_fn, x: jax.Array, ts: jax.Array) -> jax.Array:
    """As `Euler.sample`."""
    lam = jnp.log1p(-ts) - jnp.log(ts)            # [B, S + 1], -inf at t = 1, +inf at t = 0

    def step(i, carry):
      x, d_prev, h_prev = carry
      t, t_next = ts[:, i], ts[:, i + 1]
      d = x - _per_item(t, x.ndim) * velocity_fn(x, t)
      h = lam[:, i + 1] - lam[:, i]
      second = jnp.isfinite(h) & jnp.isfinite(h_prev) & (h_prev > 0) & (i > 0)
      c = jnp.where(second, h / jnp.where(second, 2 * h_prev, 1.0), 0.0)
      d_eff = d + _per_item(c, x.ndim) * (d - d_prev)
      moving = t > 0                                 # t = 0 already (strength 0): stay
      ratio = jnp.where(moving, t_next / jnp.where(moving, t, 1.0), 1.0)
      coef = jnp.where(moving, (1 - t_next) - (1 - t) * ratio, 0.0)
      x_next = _per_item(ratio, x.ndim) * x + _per_item(coef, x.ndim) * d_eff
      return x_next, d, jnp.where(t_next < t, h, h_prev)

    init = (x, jnp.zeros_like(x), jnp.full(ts.shape[:1], jnp.inf, ts.dtype))
    return jax.lax.fori_loop(0, self.steps, step, init)[0]


def make(name: str, steps: int):
  """The sampler called `name` (one of SAMPLERS) with `steps` steps."""
  kinds = {"euler": Euler, "heun": Heun, "dpm++2m": DPMSolver2M}
  if name not in kinds:
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
  return kinds[name](steps)


def guided(velocity_fn, cond: tuple, uncond: tuple, scale: float, interval: tuple[float, float] = (0.0, 1.0)):
  """Classifier-free guidance: one batched pass over [cond; uncond].

  velocity_fn(x, t, text_emb, text_mask) -> v; cond/uncond = (text_emb [B, L, W], mask [B, L]).
  Returns v_u + s (v_c - v_u) as a function of (x [B, ...], t [B]), where s = `scale` for items
  whose t lies in `interval` (lo <= t <= hi) and 1 (the conditional model) elsewhere.
  """
  text_emb = jnp.concatenate([cond[0], uncond[0]], axis=0)
  text_mask = jnp.concatenate([cond[1], uncond[1]], axis=0)
  lo, hi = interval

  def fn(x, t):
    v = velocity_fn(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), text_emb, text_mask)
    v_cond, v_uncond = jnp.split(v, 2, axis=0)
    s = jnp.where((t >= lo) & (t <= hi), scale, 1.0).astype(v.dtype)
    return v_uncond + _per_item(s, v.ndim) * (v_cond - v_uncond)

  return fn
