"""The VAE on the mesh: its train step splits the batch over data and fsdp, keeps its
parameters replicated, and computes what one device computes."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import VAE, VAE_SMALL, compiled_train_step
from jaxvid import config


def _two_steps(mesh_shape, devices):
  cfg = config.load(f"{VAE}:S", VAE_SMALL + [f"--config.mesh.{a}={s}" for a, s in zip(config.MESH_AXES, mesh_shape)])
  t = compiled_train_step(cfg, devices)
  batch = next(t.loader)
  assert batch["video"].sharding.is_equivalent_to(NamedSharding(t.mesh, P(("data", "fsdp"))), 5) or t.mesh.size == 1
  state, first = t.step(t.state, batch, {})
  state, second = t.step(state, next(t.loader), {})
  for leaf in jax.tree.leaves(state.params):
    assert leaf.sharding.is_equivalent_to(NamedSharding(t.mesh, P()), leaf.ndim)
  return float(first["loss"]), float(second["loss"]), jax.tree.map(np.asarray, state.params)


def test_vae_train_step_on_data_and_fsdp_matches_one_device():
  first1, loss1, params1 = _two_steps((1, 1, 1, 1), jax.devices()[:1])
  first8, loss8, params8 = _two_steps((2, 4, 1, 1), jax.devices())
  np.testing.assert_allclose(first8, first1, rtol=1e-5)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
