"""The VAE on the mesh: its train step splits the batch over data and fsdp, keeps its
parameters replicated, and computes what one device computes."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import VAE, VAE_SMALL
from jaxvid import config
from jaxvid.data import pipeline
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.train import state as state_lib
from jaxvid.train import step as step_lib
from jaxvid.train import vae_step


def _two_steps(mesh_shape, devices):
  cfg = config.load(f"{VAE}:S", VAE_SMALL + [f"--config.mesh.{a}={s}" for a, s in zip(config.MESH_AXES, mesh_shape)])
  config.validate(cfg, len(devices), train=True)
  mesh = mesh_lib.make_mesh(cfg, devices)
  rules = sharding.rules_from_config(cfg)
  tx, schedule = state_lib.make_optimizer(cfg)
  graphdef, init, abstract = state_lib.abstract_state(cfg, tx)
  shardings = state_lib.state_shardings(abstract, mesh, rules)
  state = state_lib.create(init, shardings)
  loader = pipeline.Loader(cfg, mesh, rules)
  step = step_lib.compile_train_step(vae_step.make_train_step(cfg, graphdef, tx, schedule), mesh, rules,
                                     shardings, loader.shardings(pipeline.batch_spec(cfg)))
  batch = next(loader)
  assert batch["video"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 5) or mesh.size == 1
  state, metrics = step(state, batch, {})
  state, metrics = step(state, next(loader), {})
  for leaf in jax.tree.leaves(state.params):
    assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), leaf.ndim)
  return float(metrics["loss"]), jax.tree.map(np.asarray, state.params)


def test_vae_train_step_on_data_and_fsdp_matches_one_device():
  loss1, params1 = _two_steps((1, 1, 1, 1), jax.devices()[:1])
  loss8, params8 = _two_steps((2, 4, 1, 1), jax.devices())
  np.testing.assert_allclose(loss8, loss1, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
