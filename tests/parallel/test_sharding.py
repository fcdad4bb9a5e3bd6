"""Logical-to-mesh rules, parameter shardings on 8 simulated devices, and the same train step
on different meshes."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import SMALL, TINY, compiled_train_step, one_device_env
from mixed_items import assert_same_videos, write_mixed_prompts
from jaxvid import config
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.train import state as state_lib
from jaxvid.train import step as step_lib


def test_logical_to_spec_uses_each_mesh_axis_once():
  rules = {"batch": ("data", "fsdp"), "embed": ("fsdp",), "length": ("sequence",)}
  assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), "sequence", None)
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", None)
  assert sharding.logical_to_spec((None, "embed"), rules) == P(None, "fsdp")


def _setup(*overrides):
  cfg = config.load(TINY, SMALL + list(overrides))
  config.validate(cfg, jax.device_count(), train=True)
  mesh = mesh_lib.make_mesh(cfg)
  rules = sharding.rules_from_config(cfg)
  tx, schedule = state_lib.make_optimizer(cfg)
  graphdef, init, abstract = state_lib.abstract_state(cfg, tx)
  shardings = state_lib.state_shardings(abstract, mesh, rules)
  return cfg, mesh, rules, tx, schedule, graphdef, state_lib.create(init, shardings), shardings


@pytest.mark.parametrize("mesh, expect", [
    ((1, 8, 1, 1), {"q": P(None, "fsdp", None), "o": P(None, None, "fsdp"), "fc1": P(None, "fsdp", None)}),
    ((2, 2, 2, 1), {"q": P(None, "fsdp", "tensor"), "o": P(None, "tensor", "fsdp"), "fc1": P(None, "fsdp", "tensor")}),
    ((8, 1, 1, 1), {"q": P(), "o": P(), "fc1": P()}),
])
def test_parameters_are_created_sharded_by_the_rules(mesh, expect):
  data, fsdp, tensor, seq = mesh
  *_, m, _, _, _, _, state, _ = _setup(f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                                       f"--config.mesh.tensor={tensor}", f"--config.mesh.sequence={seq}")
  blocks = state.params["blocks"]
  arrays = {"q": blocks["attn1"]["q"]["kernel"], "o": blocks["attn1"]["o"]["kernel"], "fc1": blocks["ffn"]["fc1"]["kernel"]}
  for name, spec in expect.items():
    arr = arrays[name][...]
    assert arr.sharding.is_equivalent_to(NamedSharding(m, spec), arr.ndim), (name, arr.sharding)
  # Adam moments follow their parameters.
  mu = state.opt_state[1][0].mu["blocks"]["attn1"]["q"]["kernel"][...]
  assert mu.sharding.is_equivalent_to(NamedSharding(m, expect["q"]), mu.ndim)
  if fsdp == 8:   # each device holds 1/8 of the kernel
    assert arrays["q"][...].addressable_shards[0].data.size == arrays["q"][...].size // 8


# Width 64 with 8 heads, so that Ulysses can split the heads 8 ways.
HEADS8 = ("--config.model.width=64", "--config.model.heads=8")


def _two_steps(mesh_shape, *overrides, devices=None):
  """Loss of the 2nd step and the parameters after it, on the given mesh."""
  cfg = config.load(TINY, SMALL + list(HEADS8) + list(overrides) + [
      f"--config.mesh.{a}={s}" for a, s in zip(config.MESH_AXES, mesh_shape)])
  t = compiled_train_step(cfg, devices)
  state, metrics = t.step(t.state, next(t.loader), {})
  state, metrics = t.step(state, next(t.loader), {})
  return float(metrics["loss"]), jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def one_device():
  return _two_steps((1, 1, 1, 1), devices=[jax.devices()[0]])


# Every axis, each scheme of context parallelism (attention alone is tested on more meshes in
# test_context.py; pure data parallelism in the multi-process tests).
@pytest.mark.parametrize("mesh_shape, scheme", [
    ((1, 8, 1, 1), "ulysses"), ((2, 2, 2, 1), "ulysses"), ((1, 2, 1, 4), "ulysses"), ((1, 1, 1, 8), "ring"),
])
def test_two_train_steps_match_one_device(one_device, mesh_shape, scheme):
  loss, params = _two_steps(mesh_shape, f"--config.model.context_parallel={scheme}")
  # f32 throughout; sums (matmuls, attention, the loss and gradient means, the gradient norm)
  # reduce in a different order on each mesh, which moves results by a few ulps (~1e-7
  # relative). Two Adam steps divide by sqrt(second moment), which can amplify that for
  # coordinates with tiny gradients; 1e-5 relative on the loss and 1e-4 on parameters is
  # still far below the effect of one step (lr 1e-3).
  assert loss == pytest.approx(one_device[0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one_device[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_meshes_are_one_line_errors():
  from jaxvid.errors import UserError
  cases = [
      (["--config.mesh.data=3"], "mesh {'data': 3, 'fsdp': 1, 'tensor': 1, 'sequence': 1} has 3 devices but 8"),
      (["--config.mesh.data=1", "--config.mesh.tensor=8"], "model.heads=2 is not divisible by mesh.tensor=8"),
      (["--config.mesh.data=1", "--config.mesh.sequence=8"], "needs model.heads/mesh.tensor=2 divisible by"),
      (["--config.mesh.data=1", "--config.mesh.sequence=8", "--config.video.frames=2", "--config.video.width=20"],
       "20 tokens per clip are not divisible by mesh.sequence=8"),
      (["--config.mesh.data=8", "--config.mesh.dcn_data=3"], "mesh.dcn_data=3 must be positive and divide mesh.data=8"),
      (["--config.model.context_parallel=star"], "model.context_parallel='star' must be one of"),
  ]
  for overrides, message in cases:
    cfg = config.load(TINY, SMALL + overrides)
    with pytest.raises(UserError, match=re.escape(message)):
      config.validate(cfg, 8, train=True)
  cfg = config.load(TINY, SMALL + ["--config.mesh.data=8", "--config.mesh.dcn_data=2"])
  config.validate(cfg, 8)
  with pytest.raises(UserError, match=re.escape("the product of mesh.dcn_* must equal the number of processes")):
    mesh_lib.make_mesh(cfg)            # one process cannot span two hosts


@pytest.mark.parametrize("slices, granule", [(lambda i: 0, "process_index"), (lambda i: i // 4, "slice_index")])
def test_hybrid_mesh_spans_processes_unless_devices_sit_in_several_slices(slices, granule):
  # Device records as a 2-process job reports them; some CPU/GPU builds set slice_index=0 on every device, and
  # then the processes (not the single slice) must be the outer (DCN) granule.
  import types
  devices = [types.SimpleNamespace(id=i, process_index=i // 2 if granule == "slice_index" else i // 4,
                                   slice_index=slices(i), platform="cpu", device_kind="cpu") for i in range(8)]
  grid = mesh_lib._hybrid((2, 4, 1, 1), (2, 1, 1, 1), devices)
  assert grid.shape == (2, 4, 1, 1)
  for outer in range(2):                  # each index of the dcn axis holds exactly one granule
    assert {getattr(d, granule) for d in grid[outer].ravel()} == {outer}


def test_sampling_gives_the_same_videos_on_one_device_and_on_split_meshes(trained_run, tmp_path, monkeypatch):
  """Mesh invariance: one device with a batch of 1 vs 8 devices with batches of 8, split over
  data, sequence (ring and Ulysses) and fsdp; items of one chunk and of several. Rows that
  several devices hold (sequence, fsdp) are written once."""
  import collections
  import subprocess
  import sys
  from jaxvid import cli
  from jaxvid.sample import writer
  writes = collections.Counter()
  write_files = writer.OutputFolder.write_files

  def counting(self, item_id, *args):
    writes[item_id] += 1
    return write_files(self, item_id, *args)

  monkeypatch.setattr(writer.OutputFolder, "write_files", counting)
  prompts = write_mixed_prompts(tmp_path)
  args = ["sample", "--workdir", str(trained_run), "--prompts", prompts]
  env = one_device_env()
  proc = subprocess.run([sys.executable, "-m", "jaxvid", *args, "--output", str(tmp_path / "one"),
                         "--config.sample.batch_size=1"], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  for i, mesh in enumerate((["--config.mesh.data=1", "--config.mesh.sequence=8", "--config.model.context_parallel=ring"],
                            ["--config.mesh.data=4", "--config.mesh.sequence=2"],       # Ulysses
                            ["--config.mesh.data=1", "--config.mesh.fsdp=8"],
                            ["--config.mesh.data=8", "--config.sample.batch_size=8"])):
    writes.clear()
    assert cli.main([*args, "--output", str(tmp_path / str(i)), *mesh]) == 0
    assert_same_videos(tmp_path / "one", tmp_path / str(i), mesh)
    assert sorted(writes.values()) == [1, 1, 1, 1], (mesh, writes)


def test_memory_per_device_shrinks_with_fsdp_and_sequence():
  """From the compiled step's memory analysis (nothing runs): the train state split 8 ways
  by fsdp, and activations split by the sequence axis."""
  base = SMALL + ["--config.model.patch=(1,2,2)", "--config.model.width=64", "--config.model.heads=8",
                  "--config.train.batch_size=8"]                       # 4 x 8 x 8 = 256 tokens

  def analysis(data, fsdp, seq):
    cfg = config.load(TINY, base + [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                                    f"--config.mesh.sequence={seq}"])
    devices = jax.devices()[:data * fsdp * seq]
    return step_lib.compile_for_mesh(cfg, mesh_lib.make_mesh(cfg, devices)).memory_analysis()

  one, fsdp8 = analysis(1, 1, 1), analysis(1, 8, 1)
  # Arguments are the state and a batch of 8 uint8 clips; the state dominates.
  assert fsdp8.argument_size_in_bytes <= 1.2 / 8 * one.argument_size_in_bytes
  assert analysis(1, 1, 8).temp_size_in_bytes < 0.35 * one.temp_size_in_bytes
