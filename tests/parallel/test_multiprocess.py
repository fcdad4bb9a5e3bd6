"""Real multi-process JAX jobs on this machine (launch/local.sh: processes joined by
jax.distributed over 127.0.0.1 with gloo collectives). Training with two processes is in
test_multiprocess_data.py."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import COMPILE_FLAGS, REPO, SMALL, TINY, run_local

pytestmark = pytest.mark.multiprocess

def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
  env.update(extra)
  return env


def _free_port():
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


@pytest.mark.parametrize("counts", [("0", "2"), ("-1", "2"), ("abc", "2"), ("2", "0"), ("1", "2x")])
def test_bad_process_or_device_counts_are_one_line_and_exit_2(counts):
  r = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), *counts, "true"], capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 2 and r.stdout == "", r
  assert r.stderr.strip().splitlines() == [f"launch/local.sh: error: NUM_PROCESSES and DEVICES_PER_PROCESS must be "
                                           f"whole numbers >= 1, got '{counts[0]}' and '{counts[1]}'"]


def test_unreachable_coordinator_is_a_clear_error(tmp_path):
  env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "jaxvid", "train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                         *SMALL, "--config.distributed.timeout_s=5"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "could not join the multi-process job at 127.0.0.1" in proc.stderr
  assert time.time() - t0 < 60
  assert not (tmp_path / "w").exists()


def test_processes_with_different_configs_are_refused(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "jaxvid", "train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                             *SMALL, f"--config.optim.lr={lr}", "--config.distributed.timeout_s=60"],
                            env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=4 " + COMPILE_FLAGS),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, lr in enumerate((1e-3, 2e-3))]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 2, out
    assert "processes [1] run a different config from process 0" in out, out
  assert not (tmp_path / "w").exists()


def test_two_processes_sample_like_one_and_write_each_item_once(trained_run, tmp_path):
  """2 processes x 4 devices share the lanes of every batch (chained chunks stay on their
  process); each item's files are written by one process, the manifest by process 0."""
  from mixed_items import MIXED, assert_same_videos, write_mixed_prompts
  from jaxvid import cli
  prompts = write_mixed_prompts(tmp_path)
  args = ["sample", "--workdir", str(trained_run), "--prompts", prompts, "--config.sample.batch_size=2"]
  rc, out, other = run_local(2, 4, [*args, "--output", str(tmp_path / "mp"), "--config.mesh.data=2",
                                     "--config.mesh.fsdp=4"], tmp_path / "logs")
  assert rc == 0, out + other
  assert cli.main([*args, "--output", str(tmp_path / "one")]) == 0          # one process, 8 devices
  assert_same_videos(tmp_path / "one", tmp_path / "mp", "2 processes")
  lines = open(tmp_path / "mp" / "manifest.jsonl").read().splitlines()
  assert sorted(json.loads(line)["id"] for line in lines) == sorted(r["id"] for r in MIXED)
  assert not [f for f in os.listdir(tmp_path / "mp") if ".tmp-" in f]


def test_two_processes_export_like_one_and_never_overwrite(trained_run, tmp_path):
  """`jaxvid export` in a 2-process job: both processes read the run, process 0 writes the
  files; the export holds the parameters a one-process export holds."""
  import numpy as np
  import orbax.checkpoint as ocp
  from jaxvid import cli
  args = lambda out: ["export", "--workdir", str(trained_run), "--output", str(tmp_path / out)]
  rc, out, other = run_local(2, 2, args("mp"), tmp_path / "logs")
  assert rc == 0, out + other
  assert cli.main(args("one")) == 0
  assert sorted(os.listdir(tmp_path / "mp")) == sorted(os.listdir(tmp_path / "one")) == [
      "config.json", "export.json", "params"]
  assert (tmp_path / "mp" / "config.json").read_text() == (tmp_path / "one" / "config.json").read_text()
  import jax
  with ocp.StandardCheckpointer() as c:       # both read onto one device
    path = lambda name: str(tmp_path / name / "params")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), c.metadata(path("one")).item_metadata)
    mp, one = c.restore(path("mp"), target), c.restore(path("one"), target)
  assert len(jax.tree.leaves(one)) > 10
  for x, y in zip(jax.tree.leaves(mp), jax.tree.leaves(one), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Again to the same output: refused on every process, the export untouched.
  before = {f: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(tmp_path / "mp") for f in fs}
  rc, out, other = run_local(2, 2, args("mp"), tmp_path / "logs2")
  assert rc == 2 and "already exists; choose a new path" in out, out + other
  assert {f: os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(tmp_path / "mp") for f in fs} == before
  # A folder left by an interrupted export: process 0 refuses, and process 1 stops with it.
  os.makedirs(tmp_path / "again.partial")
  rc, out, other = run_local(2, 2, args("again"), tmp_path / "logs3")
  assert rc == 2 and "again.partial exists (an interrupted export?)" in out, out + other
  assert "processes [0] stopped with an error" in other, other
  assert os.listdir(tmp_path / "again.partial") == [] and not (tmp_path / "again").exists()


def test_ctrl_c_to_the_whole_job_saves_a_checkpoint_and_exits_0(tmp_path):
  """A terminal's Ctrl-C signals its whole process group: launch/local.sh, its output relays and
  every process. The relays outlive it, so the processes save at the next step and exit 0."""
  import signal
  workdir = tmp_path / "run"
  env = _env(JAXVID_LOG_DIR=str(tmp_path / "logs"))
  proc = subprocess.Popen([os.path.join(REPO, "launch", "local.sh"), "2", "2", sys.executable, "-m", "jaxvid",
                           "train", "--config", TINY, "--workdir", str(workdir), *SMALL, "--config.mesh.data=2",
                           "--config.mesh.fsdp=2", "--config.train.steps=100000", "--config.train.log_every=1",
                           "--config.checkpoint.every=100000"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    deadline = time.time() + 300
    while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text().strip():
      assert time.time() < deadline and proc.poll() is None, "the job never logged a step"
      time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0 and "received SIGINT" in out, out
  saved = os.listdir(workdir / "checkpoints")
  assert len(saved) == 1 and int(saved[0]) > 0 and f"saved {workdir}/checkpoints/{saved[0]}" in out, out
