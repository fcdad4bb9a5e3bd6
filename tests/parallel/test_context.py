"""Context-parallel attention (Ulysses all-to-all and ring) equals plain attention, forward
and backward, with tokens split over the sequence axis of 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.models import attention
from jaxvid.parallel import context, sharding
from jaxvid.parallel.mesh import make_mesh
from jaxvid import config


def _mesh(shape):
  cfg = config.base_config()
  cfg.mesh.update(dict(zip(config.MESH_AXES, shape)))
  return make_mesh(cfg), sharding.rules_from_config(cfg)


@pytest.mark.parametrize("scheme, heads, mesh_shape", [
    ("ulysses", 8, (1, 1, 1, 8)),
    ("ulysses", 4, (1, 2, 1, 4)),
    ("ulysses", 8, (1, 1, 2, 4)),      # 4 heads per tensor shard, one per sequence device
    ("ring", 2, (1, 1, 1, 8)),         # heads do not divide the sequence axis
    ("ring", 4, (2, 1, 2, 2)),
])
def test_matches_plain_attention_forward_and_backward(scheme, heads, mesh_shape):
  mesh, rules = _mesh(mesh_shape)
  shape = (2, 64, heads, 8)                       # [B, N, heads, K]
  q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
  plain = lambda q, k, v: attention.attend(q, k, v)

  def loss(q, k, v, split):
    if split:
      with sharding.activation_rules(mesh, rules):
        out = context.self_attention(q, k, v, scheme, plain)
    else:
      out = plain(q, k, v)
    return jnp.sum(out * jnp.cos(out)), out

  expected_grads, expected = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
  spec = sharding.logical_to_spec((sharding.BATCH, sharding.LENGTH, sharding.ACT_HEADS, None), rules, mesh)
  split = jax.sharding.NamedSharding(mesh, spec)
  fn = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, True), argnums=(0, 1, 2), has_aux=True),
               in_shardings=(split,) * 3)
  grads, out = fn(q, k, v)
  # f32; the ring sums the softmax in a different order: agreement to rounding.
  np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
  for g, e in zip(grads, expected_grads):
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


def test_one_device_on_the_sequence_axis_is_plain_attention():
  mesh, rules = _mesh((8, 1, 1, 1))
  assert context.sequence_axis(mesh, rules) is None
  mesh, rules = _mesh((2, 1, 1, 4))
  assert context.sequence_axis(mesh, rules) == "sequence"
