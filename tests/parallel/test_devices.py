"""distributed.cpu_devices: how many CPU devices a process makes (-1: JAX's own count; 0: one per
core, as many as the config's batch and mesh split over; N: N), by choice and in fresh processes."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY
from jaxvid import config as config_lib
from jaxvid.errors import UserError
from jaxvid.parallel import distributed

BENCH_CPU = os.path.join(REPO, "configs", "bench_cpu.py")


@pytest.mark.parametrize("overrides, cores, expected", [
    ([], 1, 1),
    ([], 2, 2),
    ([], 3, 2),                                     # 8 clips split in 2, not 3
    ([], 16, 8),
    (["--config.train.batch_size=6"], 16, 6),
    (["--config.train.batch_size=7"], 4, 1),        # no split: one device
    (["--config.mesh.data=1"], 8, 1),               # a fixed mesh: its size
    (["--config.mesh.data=2", "--config.mesh.tensor=2"], 8, 4),
])
def test_cpu_device_count_is_the_most_the_config_splits_over(overrides, cores, expected):
  cfg = config_lib.load(TINY, overrides)
  assert distributed.cpu_device_count(cfg, cores, cfg.train.batch_size) == expected


def test_a_command_without_a_global_batch_takes_every_core():
  cfg = config_lib.load(TINY, ["--config.train.batch_size=12"])    # the config stays valid on 6
  assert distributed.cpu_device_count(cfg, 6, None) == 6          # jaxvid encode: batches per device
  assert distributed.cpu_device_count(cfg, 6, cfg.sample.batch_size) == 4   # sampling 16 at a time


def test_bench_cpu_batch_of_two_takes_two_cores():
  assert distributed.cpu_device_count(config_lib.load(BENCH_CPU, []), 8, 2) == 2


def _devices_in_fresh_process(overrides: list[str], **env_changes) -> int:
  """jax.device_count() after distributed.initialize(tiny + overrides, batch=8) in a new
  process whose environment is this one's with `env_changes` (None: removed)."""
  env = dict(os.environ)
  for key, value in env_changes.items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  code = ("import jax\n"
          "from jaxvid import config as c\n"
          "from jaxvid.parallel import distributed as d\n"
          f"d.initialize(c.load({TINY!r}, {overrides!r}), batch=8)\n"
          "print(jax.device_count())\n")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  return int(proc.stdout.split()[-1])


def test_a_fresh_process_makes_one_device_per_core_when_asked():
  auto = ["--config.distributed.cpu_devices=0"]
  expected = distributed.cpu_device_count(config_lib.load(TINY, auto), distributed.usable_cores(), 8)
  assert expected == max(d for d in (1, 2, 4, 8) if d <= distributed.usable_cores())   # what splits 8 clips
  assert _devices_in_fresh_process(auto, XLA_FLAGS=None, JAX_NUM_CPU_DEVICES=None) == expected
  assert _devices_in_fresh_process([], XLA_FLAGS=None, JAX_NUM_CPU_DEVICES=None) == 1     # -1: JAX's own


def test_the_environment_wins_over_auto_and_a_count_wins_over_both():
  flags = "--xla_force_host_platform_device_count=5"
  assert _devices_in_fresh_process(["--config.distributed.cpu_devices=0"], XLA_FLAGS=flags,
                                   JAX_NUM_CPU_DEVICES=None) == 5
  assert _devices_in_fresh_process(["--config.distributed.cpu_devices=0"], XLA_FLAGS=None,
                                   JAX_NUM_CPU_DEVICES="3") == 3
  assert _devices_in_fresh_process(["--config.distributed.cpu_devices=3"], XLA_FLAGS=flags) == 3


def test_a_bad_cpu_devices_is_a_clear_error():
  cfg = config_lib.load(TINY, ["--config.distributed.cpu_devices=-2"])
  with pytest.raises(UserError, match=r"distributed.cpu_devices=-2 must be -1 \(JAX's count\), 0"):
    distributed.initialize(cfg)


def _reduction_fusions_in_fresh_process(**env_changes) -> str:
  """The kinds of fusion XLA:CPU compiles a sum over tokens to, after distributed.initialize in a
  new process with `env_changes` (None: removed): "ynn" (a YNNPACK reduction) or "xla"."""
  env = {k: v for k, v in {**os.environ, **env_changes}.items() if v is not None}
  code = ("import jax, jax.numpy as jnp\n"
          "from jaxvid import config as c\n"
          "from jaxvid.parallel import distributed as d\n"
          f"d.initialize(c.load({TINY!r}, []))\n"
          "x = jnp.ones((1, 2048, 384))\n"
          "text = jax.jit(lambda x: (x * x).sum(1)).lower(x).compile().as_text()\n"
          "print('ynn' if 'ynn_fusion' in text else 'xla')\n")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.split()[-1]


def test_commands_turn_off_ynnpack_reductions_unless_xla_flags_names_the_option():
  assert _reduction_fusions_in_fresh_process(XLA_FLAGS=None) == "xla"
  assert _reduction_fusions_in_fresh_process(XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=+reduce") == "ynn"


def test_xla_cpu_flags_keep_the_users_own(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
  distributed.set_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=3 "
                                     "--xla_cpu_experimental_ynn_fusion_type=-reduce")
  distributed.set_xla_cpu_flags()                                    # twice: added once
  assert os.environ["XLA_FLAGS"].count("ynn_fusion_type") == 1
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+reduce")
  distributed.set_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+reduce"
