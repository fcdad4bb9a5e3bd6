"""Rectified flow: timesteps, shift, interpolation, and the sampler on a known flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxvid import config
from jaxvid.diffusion import flow as flow_lib
from jaxvid.diffusion import samplers


def test_shift_grows_with_tokens():
  small = config.load(TINY, ["--config.video.height=16", "--config.video.width=16"])
  large = config.load(TINY, ["--config.video.frames=32", "--config.video.height=64", "--config.video.width=64"])
  assert flow_lib.resolve_shift(small) < flow_lib.resolve_shift(large)
  fixed = config.load(TINY, ["--config.flow.shift=3.0"])
  assert flow_lib.resolve_shift(fixed) == 3.0
  # At the reference token counts the shift is exp(shift_base) and exp(shift_max).
  cfg = config.load(TINY, ["--config.flow.shift_base_tokens=256", "--config.video.frames=8",
                           "--config.video.height=32", "--config.video.width=32"])   # 4*8*8 = 256 tokens
  assert flow_lib.resolve_shift(cfg) == pytest.approx(np.exp(cfg.flow.shift_base))


def test_timesteps_in_range_and_shifted_towards_noise():
  t0 = flow_lib.Flow(shift=1.0).sample_t(jax.random.key(0), 20000)
  t3 = flow_lib.Flow(shift=3.0).sample_t(jax.random.key(0), 20000)
  assert float(t0.min()) > 0 and float(t0.max()) < 1
  assert abs(float(t0.mean()) - 0.5) < 0.01          # logit-normal(0, 1) is symmetric
  assert float(t3.mean()) > float(t0.mean()) + 0.1
  sched = flow_lib.Flow(shift=3.0).schedule(10)
  assert float(sched[0]) == 1.0 and float(sched[-1]) == 0.0 and bool(jnp.all(jnp.diff(sched) < 0))


def test_interpolate_endpoints():
  x0, noise = jnp.ones((2, 3)), jnp.zeros((2, 3))
  np.testing.assert_allclose(flow_lib.interpolate(x0, noise, jnp.array([0.0, 1.0])), [[1, 1, 1], [0, 0, 0]])


def test_loss_is_zero_for_the_true_velocity():
  x0 = jax.random.normal(jax.random.key(0), (4, 5))
  flow = flow_lib.Flow()
  rng = jax.random.key(1)
  rng_t, rng_n = jax.random.split(rng)
  noise = jax.random.normal(rng_n, x0.shape)
  loss = flow_lib.loss(lambda x, t: noise - x0, x0, rng, flow)
  assert float(loss) == pytest.approx(0.0, abs=1e-10)


def test_euler_recovers_a_gaussian_and_converges_at_first_order():
  """Data N(mu, s^2): the exact velocity is known in closed form, so the sampler's error can be measured."""
  mu, s = 2.0, 0.5

  def velocity(x, t):
    t = t[:, None]
    # x_t = (1-t) x0 + t eps; E[x0 | x_t] for Gaussian x0 gives v = (x - E[x0|x_t]) / t, written in closed form:
    var = (1 - t) ** 2 * s**2 + t**2
    x0_hat = mu + (1 - t) * s**2 * (x - (1 - t) * mu) / var
    return (x - x0_hat) / jnp.maximum(t, 1e-6)

  noise = jax.random.normal(jax.random.key(0), (20000, 1))
  flow = flow_lib.Flow(shift=1.0)
  exact = lambda e: mu + s * e   # the flow maps eps to mu + s eps exactly (a linear map for Gaussians)
  errors = []
  for steps in (8, 16, 32):
    x = samplers.Euler(steps).sample(velocity, noise, flow)
    errors.append(float(jnp.mean(jnp.abs(x - exact(noise)))))
  assert errors[-1] < 0.02
  # First order: halving the step roughly halves the error.
  for a, b in zip(errors, errors[1:]):
    assert 1.6 < a / b < 2.4, errors


def test_guidance_scale_one_is_the_conditional_model():
  def velocity(x, t, emb, mask):
    return x * emb[:, :1, 0][:, :, None] + t[:, None, None]
  cond = (jnp.full((2, 3, 4), 2.0), jnp.ones((2, 3), bool))
  uncond = (jnp.full((2, 3, 4), 5.0), jnp.ones((2, 3), bool))
  x, t = jnp.ones((2, 1, 1)), jnp.array([0.5, 0.5])
  np.testing.assert_allclose(samplers.guided(velocity, cond, uncond, 1.0)(x, t), velocity(x, t, *cond))
  # scale 3: v_u + 3 (v_c - v_u) = 5.5 + 3 * (2.5 - 5.5)
  np.testing.assert_allclose(samplers.guided(velocity, cond, uncond, 3.0)(x, t), 5.5 + 3 * (2.5 - 5.5))
