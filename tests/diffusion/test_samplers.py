"""Samplers against a case with a known answer: Gaussian data, whose flow is linear.

For x0 ~ N(mu, s^2) and x_t = (1 - t) x0 + t eps, the velocity E[eps - x0 | x_t] has a closed
form, and the ODE from t = 1 maps eps to mu + s eps exactly, so each sampler's error can be
measured as the step count doubles: first order halves it, second order quarters it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.diffusion import flow as flow_lib
from jaxvid.diffusion import samplers

MU, S = 2.0, 0.5


def gaussian_velocity(x, t):
  """The exact velocity field for N(MU, S^2) data; x [B, D], t [B]."""
  t = t[:, None]
  a = 1 - t
  var = a**2 * S**2 + t**2
  return (t - a * S**2) * (x - a * MU) / var - MU


def _errors(sampler_cls, steps_list, shift):
  noise = jnp.linspace(-3.0, 3.0, 61)[:, None]
  flow = flow_lib.Flow(shift=shift)
  errors = []
  for steps in steps_list:
    ts = jnp.broadcast_to(flow.schedule(steps), (noise.shape[0], steps + 1))
    x = jax.jit(sampler_cls(steps).sample, static_argnums=0)(gaussian_velocity, noise, ts)
    errors.append(float(jnp.max(jnp.abs(x - (MU + S * noise)))))
  return errors


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("name, order, low", [("euler", 1, 0.9), ("heun", 2, 1.8), ("dpm++2m", 2, 1.5)])
def test_sampler_converges_at_its_order(name, order, low, shift):
  errors = _errors(type(samplers.make(name, 1)), (32, 64, 128, 256), shift)
  rates = [np.log2(a / b) for a, b in zip(errors, errors[1:])]
  # The observed order (log2 of the error ratio per halving of the step) settles at the
  # method's order as the steps shrink. DPM-Solver++(2M) approaches 2 from below (1.7-1.8
  # here): on a grid uniform in t its last steps are O(1) in lambda = log((1 - t) / t), which
  # costs a log N factor (its error is O(log N / N^2)); its error is still far below Euler's.
  assert low < rates[-1] < order + 0.35, (errors, rates)
  assert errors[-1] < (0.02 if order == 1 else 2e-3), errors


def test_second_order_samplers_beat_euler_at_equal_model_evaluations():
  euler = _errors(samplers.Euler, (32,), 3.0)[0]
  heun = _errors(samplers.Heun, (16,), 3.0)[0]
  dpm = _errors(samplers.DPMSolver2M, (32,), 3.0)[0]
  assert heun < euler / 4 and dpm < euler / 4, (euler, heun, dpm)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_per_item_start_times(name):
  """Strength 0 returns the input untouched; strength 1 is the full schedule; in between the
  item starts at that noise level (here: a noised data point lands on the exact flow)."""
  flow = flow_lib.Flow(shift=3.0)
  start = jnp.array([0.0, 1.0, 0.6])
  ts = flow.schedule(64, start)
  np.testing.assert_allclose(ts[:, 0], start, rtol=1e-6)
  np.testing.assert_array_equal(ts[:, -1], 0.0)
  eps = jnp.array([[0.3], [-1.2], [0.8]])
  # x at t = 0.6 on the exact trajectory of eps: a mu + sqrt(var) eps.
  a = 0.4
  x_mid = a * MU + jnp.sqrt(a**2 * S**2 + 0.36) * eps[2]
  x = jnp.stack([jnp.array([1.234]), eps[1], x_mid])
  out = samplers.make(name, 64).sample(gaussian_velocity, x, ts)
  assert float(out[0, 0]) == float(x[0, 0])          # bit for bit
  tol = {"euler": 0.05, "heun": 2e-3, "dpm++2m": 1e-2}[name]
  np.testing.assert_allclose(out[1:], MU + S * eps[1:], atol=tol)


def test_unknown_sampler():
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.make("ddim", 10)


def _text_velocity(x, t, emb, mask):
  return x * emb[:, :1, 0][:, :, None] + t[:, None, None]


def test_guidance_scale_one_is_the_conditional_model():
  cond = (jnp.full((2, 3, 4), 2.0), jnp.ones((2, 3), bool))
  uncond = (jnp.full((2, 3, 4), 5.0), jnp.ones((2, 3), bool))
  x, t = jnp.ones((2, 1, 1)), jnp.array([0.5, 0.5])
  np.testing.assert_allclose(samplers.guided(_text_velocity, cond, uncond, 1.0)(x, t), _text_velocity(x, t, *cond))
  # scale 3: v_u + 3 (v_c - v_u) = 5.5 + 3 * (2.5 - 5.5)
  np.testing.assert_allclose(samplers.guided(_text_velocity, cond, uncond, 3.0)(x, t), 5.5 + 3 * (2.5 - 5.5))


def test_guidance_interval_applies_the_scale_only_inside_it():
  cond = (jnp.full((3, 3, 4), 2.0), jnp.ones((3, 3), bool))
  uncond = (jnp.full((3, 3, 4), 5.0), jnp.ones((3, 3), bool))
  x, t = jnp.ones((3, 1, 1)), jnp.array([0.9, 0.5, 0.1])
  v = samplers.guided(_text_velocity, cond, uncond, 3.0, interval=(0.2, 0.8))(x, t)
  v_cond = _text_velocity(x, t, *cond)
  v_uncond = _text_velocity(x, t, *uncond)
  np.testing.assert_allclose(v[0], v_cond[0])                                  # above the interval
  np.testing.assert_allclose(v[1], v_uncond[1] + 3 * (v_cond[1] - v_uncond[1]))  # inside
  np.testing.assert_allclose(v[2], v_cond[2])                                  # below
