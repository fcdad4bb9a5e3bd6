"""Rectified flow: timesteps, shift, interpolation, and the sampler on a known flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from jaxvid import config
from jaxvid.diffusion import flow as flow_lib


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
