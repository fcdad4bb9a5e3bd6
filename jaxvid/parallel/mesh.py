"""The device mesh: named axes (data, fsdp, tensor, sequence) sized by `config.mesh`."""

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from jaxvid import config as config_lib
from jaxvid.errors import UserError
from jaxvid.parallel import sharding


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A Mesh over all devices (or `devices`) with axes `config.MESH_AXES`."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = config_lib.mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in config_lib.MESH_AXES)
  dcn = tuple(cfg.mesh[f"dcn_{a}"] for a in config_lib.MESH_AXES)
  if any(d > 1 for d in dcn):
    return Mesh(_hybrid(shape, dcn, devices), config_lib.MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):  # no topology-aware layout: keep order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, config_lib.MESH_AXES)


def _hybrid(shape: tuple[int, ...], dcn: tuple[int, ...], devices: list) -> np.ndarray:
  """Devices laid out so that axis i spans dcn[i] slices (TPU) or processes (GPU, CPU)."""
  ici = tuple(s // d for s, d in zip(shape, dcn))
  # Slices are the outer granule on multi-slice TPU; elsewhere (GPU nodes, CPU processes, and platforms
  # that set slice_index to 0 everywhere) the processes are.
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  try:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)
  except (ValueError, AssertionError) as e:
    granules = "slices" if by_slice else "processes"
    raise UserError(f"mesh {dict(zip(config_lib.MESH_AXES, shape))} with dcn sizes {dcn} does not fit the "
                    f"{granules} of this job ({e}); the product of mesh.dcn_* must equal the number of "
                    f"{granules}") from None


def batch_sharding(mesh: Mesh, rules: sharding.Rules, ndim: int) -> NamedSharding:
  """Sharding of a batch: leading axis over the batch axes, the rest replicated."""
  return NamedSharding(mesh, sharding.logical_to_spec((sharding.BATCH,) + (None,) * (ndim - 1), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
