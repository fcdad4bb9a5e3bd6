"""Fault tolerance: bit-exact resume after SIGKILL, SIGTERM and Ctrl-C at random steps,
interrupted saves, restoring onto other meshes, export, and --init_from.

The kill tests run `jaxvid train` as real subprocesses (one CPU device each) and compare
them with an uninterrupted run: parameters, optimizer state and logged losses match bitwise.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from conftest import SMALL, TINY, one_device_env, train_small
from jaxvid import cli, config
from jaxvid.data import pipeline
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.sample import writer
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import state as state_lib

# 8 frames of 32x32 (256 tokens): slow enough (~0.1 s a step) to be killed at a chosen step.
KILL_RUN = SMALL + ["--config.video.frames=8", "--config.video.height=32", "--config.video.width=32",
                    "--config.train.steps=30", "--config.checkpoint.every=5", "--config.train.log_every=1",
                    "--config.checkpoint.keep=10"]


def _start(workdir, *extra):
  return subprocess.Popen([sys.executable, "-m", "jaxvid", "train", "--config", TINY, "--workdir", str(workdir),
                           *KILL_RUN, *extra], env=one_device_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _logged_step(workdir):
  try:
    return max(_losses(workdir), default=0)
  except (FileNotFoundError, ValueError, json.JSONDecodeError):
    return 0


def _committed(workdir):
  root = os.path.join(workdir, "checkpoints")
  names = os.listdir(root) if os.path.isdir(root) else []
  return [n for n in names if n.isdigit() and os.path.exists(os.path.join(root, n, ckpt_lib.COMMIT_MARKER))]


def _restore(workdir, step, mesh=None, devices=None):
  cfg = config.from_json(open(os.path.join(workdir, "config.json")).read())
  if mesh is not None:
    cfg.mesh.update(dict(zip(("data", "fsdp", "tensor", "sequence"), mesh)))
  m = mesh_lib.make_mesh(cfg, devices)
  tx, _ = state_lib.make_optimizer(cfg)
  _, _, abstract = state_lib.abstract_state(cfg, tx)
  shardings = state_lib.state_shardings(abstract, m, sharding.rules_from_config(cfg))
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  state = ckpt.restore(step, ckpt_lib.with_shardings(abstract, shardings))
  ckpt.close()
  return state, m


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 30-step run."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  proc = _start(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])   # (SIGINT takes the SIGTERM path: test_preemption.py)
def test_resume_after_kill_is_bit_exact(reference, tmp_path, how):
  rng = random.Random()
  kill_at = rng.randint(6, 24)                 # after at least one checkpoint, before the end
  workdir = tmp_path / "run"
  proc = _start(workdir)
  deadline = time.time() + 300
  # Kill once the run has logged kill_at and committed a checkpoint (the first async save can
  # still be in flight a few steps after it started).
  while ((_logged_step(workdir) < kill_at or not _committed(workdir)) and proc.poll() is None
         and time.time() < deadline):
    time.sleep(0.005)
  assert proc.poll() is None, f"finished before the kill at step {kill_at}"
  proc.send_signal(getattr(signal, how))
  out, _ = proc.communicate(timeout=300)
  steps = ckpt_lib.Checkpointer(str(workdir)).all_steps()
  if how == "SIGKILL":
    assert proc.returncode == -signal.SIGKILL
  else:   # a clean stop: a checkpoint at the step where it stopped, and exit 0
    assert proc.returncode == 0, out
    assert f"stopped at step {steps[-1]} of 30: saved" in out, out
    assert steps[-1] >= kill_at
  assert steps and steps[-1] < 30, (how, kill_at, steps)

  proc = _start(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert f"resumed from {workdir}/checkpoints/{steps[-1]}" in out, out
  assert _losses(workdir) == _losses(reference), (how, kill_at)
  a, _ = _restore(reference, 30)
  b, _ = _restore(workdir, 30)
  _assert_same_state(a, b)


def test_an_interrupted_save_is_never_resumed(tmp_path):
  workdir = tmp_path / "run"
  assert train_small(workdir, "--config.train.steps=4", "--config.checkpoint.every=2",
                     "--config.train.log_every=1") == 0
  ckpts = workdir / "checkpoints"
  # What a kill leaves behind: an Orbax temporary folder, and a step folder without its commit marker.
  shutil.copytree(ckpts / "4", ckpts / "6.orbax-checkpoint-tmp-1700000000")
  shutil.copytree(ckpts / "4", ckpts / "4.tmp")
  shutil.rmtree(ckpts / "4")
  os.rename(ckpts / "4.tmp", ckpts / "4")
  os.remove(ckpts / "4" / ckpt_lib.COMMIT_MARKER)
  assert ckpt_lib.Checkpointer(str(workdir)).latest_step() == 2
  assert train_small(workdir, "--config.train.steps=6", "--config.checkpoint.every=2",
                     "--config.train.log_every=1") == 0
  assert sorted(_losses(workdir)) == [1, 2, 3, 4, 5, 6]
  left = sorted(os.listdir(ckpts))
  assert "6.orbax-checkpoint-tmp-1700000000" in left                 # nothing deleted ...
  assert any(name.startswith("4.incomplete-") for name in left)        # ... only set aside
  assert ckpt_lib.Checkpointer(str(workdir)).all_steps() == [4, 6]     # checkpoint.keep=2 of tiny.py


def _rewrite(source, step, mesh, devices, workdir):
  """Restores `source`'s checkpoint onto `mesh` (sharded as it says) and saves it from there."""
  state, _ = _restore(source, step, mesh, devices)
  os.makedirs(workdir)
  shutil.copy(os.path.join(source, "config.json"), workdir)
  cfg = config.from_json(open(os.path.join(workdir, "config.json")).read())
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  ckpt.save(step, state, iter(pipeline.make_dataset(pipeline.make_source(cfg, 0, 1).batches, cfg)), cfg)
  ckpt.wait()
  ckpt.close()
  return state


@pytest.mark.parametrize("save_mesh, restore_mesh", [
    ((1, 8, 1, 1), (2, 4, 1, 1)),
    ((1, 8, 1, 1), None),            # None: one device
    (None, (1, 8, 1, 1)),
    ((2, 2, 2, 1), (1, 4, 2, 1)),
])
def test_restore_onto_another_mesh_is_exact(trained_run, tmp_path, save_mesh, restore_mesh):
  one = [jax.devices()[0]]
  workdir = tmp_path / "run"
  saved = _rewrite(trained_run, 4, save_mesh or (1, 1, 1, 1), None if save_mesh else one, workdir)
  if save_mesh == (1, 8, 1, 1):   # written from arrays split 8 ways, not from one full copy
    kernel = saved.params["blocks"]["attn1"]["q"]["kernel"][...]
    assert kernel.addressable_shards[0].data.size == kernel.size // 8
  expected, _ = _restore(trained_run, 4)
  restored, m = _restore(workdir, 4, restore_mesh or (1, 1, 1, 1), None if restore_mesh else one)
  _assert_same_state(expected, restored)
  kernel = restored.params["blocks"]["attn1"]["q"]["kernel"][...]
  assert kernel.sharding.mesh.shape == m.shape                 # placed on the target mesh directly
  assert len(kernel.sharding.device_set) == m.size


def test_export_samples_the_same_video_as_its_run(trained_run, tmp_path, capsys):
  exported = tmp_path / "export"
  assert cli.main(["export", "--workdir", str(trained_run), "--output", str(exported)]) == 0
  assert sorted(os.listdir(exported)) == ["config.json", "export.json", "params"]
  assert cli.main(["export", "--workdir", str(exported), "--output", str(tmp_path / "twice")]) == 2
  assert "is already an export: sample it as it is" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", str(trained_run), "--output", str(exported)]) == 2   # never overwrites
  args = ["--prompt", "a red circle moving left", "--config.sample.seed=3"]
  assert cli.main(["sample", "--workdir", str(trained_run), "--output", str(tmp_path / "a"), *args]) == 0
  assert cli.main(["sample", "--workdir", str(exported), "--output", str(tmp_path / "b"), *args]) == 0
  name = "a_red_circle_moving_left-3"
  np.testing.assert_array_equal(writer.read_mp4(tmp_path / "a" / f"{name}.mp4"),
                                writer.read_mp4(tmp_path / "b" / f"{name}.mp4"))
  assert json.load(open(tmp_path / "b" / f"{name}.json"))["checkpoint_step"] == 4
  # A run of another device count and mesh (here: its config says 4 devices, tensor-parallel, a
  # batch of 4; 8 are present) exports on the devices present, to the same parameters, keeping
  # the run's config but for sample.use_ema (an export holds the EMA weights).
  other = tmp_path / "run_on_4"
  shutil.copytree(trained_run, other)
  cfg = json.loads((other / "config.json").read_text())
  cfg["mesh"].update(data=2, tensor=2)
  cfg["train"]["batch_size"] = 4
  cfg["sample"]["use_ema"] = False
  # How its process 0 joined a 2-process job is recorded too; the export joins its own (none here).
  cfg["distributed"].update(initialize="on", coordinator="127.0.0.1:1", num_processes=2, process_id=0, timeout_s=5)
  (other / "config.json").write_text(json.dumps(cfg))
  export = lambda out, *more: cli.main(["export", "--workdir", str(other), "--output", str(out), *more])
  assert export(tmp_path / "export4", "--config.distributed.timeout_s=6") == 0
  exported_cfg = json.loads((tmp_path / "export4" / "config.json").read_text())
  assert exported_cfg["mesh"]["tensor"] == 2 and exported_cfg["sample"]["use_ema"] is True
  assert exported_cfg["distributed"] == {**cfg["distributed"], "initialize": "auto", "coordinator": "",
                                         "num_processes": 0, "process_id": -1, "timeout_s": 6}
  # Only distributed.* can be set; an output that cannot be made is one line; nothing is left.
  assert export(tmp_path / "e", "--config.model.width=64") == 2
  assert "--config.model.width cannot be set (only --config.distributed.*" in capsys.readouterr().err
  (tmp_path / "a_file").write_text("")
  assert export(tmp_path / "a_file" / "e") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot create" in err[0] and "choose an --output in a folder you can write" in err[0], err
  assert not (tmp_path / "e").exists()
  assert cli.main(["sample", "--workdir", str(tmp_path / "export4"), "--output", str(tmp_path / "d"), *args,
                   "--config.mesh.tensor=1", "--config.mesh.data=-1"]) == 0
  np.testing.assert_array_equal(writer.read_mp4(tmp_path / "b" / f"{name}.mp4"),
                                writer.read_mp4(tmp_path / "d" / f"{name}.mp4"))
  # An export holds the EMA weights only: asking for the raw parameters is refused, not ignored.
  assert cli.main(["sample", "--workdir", str(exported), "--output", str(tmp_path / "c"), *args,
                   "--config.sample.use_ema=false"]) == 2
  assert "holds the EMA weights only" in capsys.readouterr().err and not os.path.exists(tmp_path / "c")
  # No pickle anywhere in what we save.
  for d, _, files in os.walk(trained_run / "checkpoints"):
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]


def _counts(opt_state):
  """(Adam's count, the learning-rate schedule's count)."""
  is_count = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
  found = {type(x): int(x.count) for x in jax.tree.leaves(opt_state, is_leaf=is_count) if is_count(x)}
  return found[optax.ScaleByAdamState], found[optax.ScaleByScheduleState]


def test_init_from_takes_parameters_and_optionally_the_optimizer(trained_run, tmp_path):
  source, _ = _restore(trained_run, 4)
  export = tmp_path / "export"
  assert cli.main(["export", "--workdir", str(trained_run), "--output", str(export)]) == 0
  for name, path, flags in (("params", trained_run, []), ("opt", trained_run, ["--init_optimizer"]),
                            ("from_export", export, [])):
    workdir = tmp_path / name
    assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), *SMALL, "--config.train.steps=1",
                     "--config.optim.lr=0.0", "--init_from", str(path), *flags]) == 0
    state, _ = _restore(workdir, 1)
    assert int(state.step) == 1
    expected = source.ema if name == "from_export" else source.params      # an export holds the EMA weights
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params)):   # lr 0: unchanged
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Adam's moments (and their count) come along with --init_optimizer; the learning-rate
    # schedule is this run's either way, so the logged lr is the one applied.
    assert _counts(state.opt_state) == ((5 if flags else 1), 1)


def test_init_from_another_model_is_refused_and_the_workdir_stays_usable(trained_run, tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), *SMALL,
                   "--config.model.width=64", "--init_from", str(trained_run)]) == 2
  assert "is a different model" in capsys.readouterr().err
  # The failed start wrote its config.json but never a step: the corrected command runs there.
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), *SMALL, "--config.train.steps=1",
                   "--init_from", str(trained_run)]) == 0
  # An export is never a workdir (training would write into it).
  exported = tmp_path / "export"
  assert cli.main(["export", "--workdir", str(trained_run), "--output", str(exported)]) == 0
  before = sorted(os.listdir(exported))
  assert cli.main(["train", "--config", TINY, "--workdir", str(exported), *SMALL, "--config.train.steps=1"]) == 2
  assert "is an export; train in a new --workdir" in capsys.readouterr().err and sorted(os.listdir(exported)) == before
  # A run that did save a step is another matter.
  assert cli.main(["train", "--config", TINY, "--workdir", str(workdir), *SMALL, "--config.train.steps=1",
                   "--config.model.width=64"]) == 2
  assert "holds a run of a different model" in capsys.readouterr().err


def test_init_from_a_run_without_checkpoints_writes_nothing_there(tmp_path, capsys):
  source = tmp_path / "source"
  source.mkdir()
  (source / "config.json").write_text(config.to_json(config.load(TINY, SMALL)))
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), *SMALL,
                   "--init_from", str(source)]) == 2
  assert "no checkpoint in" in capsys.readouterr().err
  assert os.listdir(source) == ["config.json"]
