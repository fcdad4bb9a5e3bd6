"""Shared test setup: 8 simulated CPU devices (set before JAX is imported) and a very small
config for end-to-end tests."""

import os
import signal
import subprocess
import sys
import time

# Tests are dominated by XLA:CPU compiles. LLVM's optimization passes take about half of each
# and buy nothing for programs this small (a test of remat: 44 s -> 26 s); XLA's older
# elementwise-fusion emitters compile SMALL's train step in 60% of the time the MLIR-based
# ones take (8.7 -> 5.2 s, mean of 3). Subprocesses that want one device keep these flags.
# XLA aborts on a flag it does not know, and the older emitters will go one day: a fresh
# process tries the flag once (1 s; pytest-xdist's workers inherit the answer).
COMPILE_FLAGS = os.environ.get("JAXVID_TEST_COMPILE_FLAGS")
if COMPILE_FLAGS is None:
  COMPILE_FLAGS = "--xla_backend_optimization_level=0"
  _older_emitters = COMPILE_FLAGS + " --xla_cpu_use_fusion_emitters=false"
  if subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=300,
                    env={**os.environ, "XLA_FLAGS": _older_emitters, "JAX_PLATFORMS": "cpu"}).returncode == 0:
    COMPILE_FLAGS = _older_emitters
  os.environ["JAXVID_TEST_COMPILE_FLAGS"] = COMPILE_FLAGS
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + COMPILE_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the subprocesses they start) compile the same small programs: share them
# through JAX's persistent compilation cache, fresh for each pytest run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvid-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# XLA:CPU's options as jaxvid's commands set them (distributed.XLA_CPU_FLAGS), for every test:
# a command run in-process sets them only if it is the first to start JAX, so without this what
# a test measures (XLA's cost analysis, say) would depend on which test ran first.
from jaxvid.parallel import distributed  # noqa: E402  (imports JAX: after the environment above)

distributed.set_xla_cpu_flags()

import pytest  # noqa: E402


def one_device_env() -> dict:
  """This process's environment for a subprocess on one CPU device (the tests' compile flags kept)."""
  return {**os.environ, "XLA_FLAGS": COMPILE_FLAGS}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")

# configs/tiny.py shrunk further so that a train step takes milliseconds: 2x4x4 = 32 tokens.
SMALL = [
    "--config.video.frames=4", "--config.video.height=16", "--config.video.width=16",
    "--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2", "--config.model.mlp_dim=64",
    "--config.text.width=32", "--config.text.depth=1", "--config.text.heads=2", "--config.text.mlp_dim=64",
    "--config.text.max_len=48", "--config.train.batch_size=8", "--config.optim.warmup_steps=2",
    "--config.sample.steps=3", "--config.sample.batch_size=4", "--config.train.steps_per_call=1",
]


@pytest.fixture
def small_config():
  from jaxvid import config
  return config.load(TINY, SMALL)


def pytest_sessionfinish(session, exitstatus):
  # A run that selects no test (e.g. `-m multiprocess` on a machine without them) is not a failure.
  if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
    session.exitstatus = pytest.ExitCode.OK


def train_small(workdir, *overrides) -> int:
  """Runs `jaxvid train` in this process on the SMALL config; returns the exit status."""
  from jaxvid import cli
  return cli.main(["train", "--config", TINY, "--workdir", str(workdir), *SMALL, *overrides])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A SMALL run trained for 4 steps, checkpoints at 2 and 4 (shared, do not modify)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  assert train_small(workdir, "--config.train.steps=4", "--config.checkpoint.every=2",
                     "--config.train.log_every=2") == 0
  return workdir


VAE = os.path.join(REPO, "configs", "vae.py")
# configs/vae.py:S shrunk so that a step takes a fraction of a second: 5x32x32 clips -> 2x4x4x4 latents.
# (Not smaller: XLA takes several times longer to compile convolutions over 2x2 or 1x1 frames.)
VAE_SMALL = [
    "--config.vae.channels=8", "--config.vae.channel_mult=(1,1,1)", "--config.vae.latent_channels=4",
    "--config.video.frames=5", "--config.video.height=32", "--config.video.width=32",
    "--config.train.batch_size=8", "--config.optim.warmup_steps=2", "--config.vae.eval_clips=8",
    "--config.vae.stats_clips=16", "--config.vae.eval_every=2", "--config.train.log_every=2",
    "--config.train.steps_per_call=1",
]
# configs/tiny.py:latent on the latents of a VAE_SMALL run (add --config.autoencoder.checkpoint=RUN).
LATENT_SMALL = SMALL + ["--config.video.frames=5", "--config.video.height=32", "--config.video.width=32",
                        "--config.model.patch=(1,2,2)", "--config.autoencoder.latent_channels=4"]


def train_vae_small(workdir, *overrides) -> int:
  """Runs `jaxvid train` on the VAE_SMALL config in this process; returns the exit status."""
  from jaxvid import cli
  return cli.main(["train", "--config", f"{VAE}:S", "--workdir", str(workdir), *VAE_SMALL, *overrides])


@pytest.fixture(scope="session")
def trained_vae(tmp_path_factory):
  """A VAE_SMALL run trained for 4 steps, checkpoints at 2 and 4, latent statistics of step 4
  (shared, do not modify)."""
  workdir = tmp_path_factory.mktemp("vae") / "run"
  assert train_vae_small(workdir, "--config.train.steps=4", "--config.checkpoint.every=2") == 0
  return workdir


def compiled_train_step(cfg, devices=None):
  """What `jaxvid train` builds for `cfg` on `devices` (default all), in this process:
  a namespace of graphdef, state (created sharded), step (compiled for the first bucket),
  loader and mesh. The family's step comes from jaxvid.train.tasks."""
  import types

  import jax
  from jaxvid import config
  from jaxvid.data import pipeline
  from jaxvid.parallel import mesh as mesh_lib
  from jaxvid.parallel import sharding
  from jaxvid.train import state as state_lib
  from jaxvid.train import step as step_lib
  from jaxvid.train import tasks
  devices = devices or jax.devices()
  config.validate(cfg, len(devices), train=True)
  mesh = mesh_lib.make_mesh(cfg, devices)
  rules = sharding.rules_from_config(cfg)
  tx, schedule = state_lib.make_optimizer(cfg)
  graphdef, init, abstract = state_lib.abstract_state(cfg, tx)
  shardings = state_lib.state_shardings(abstract, mesh, rules)
  loader = pipeline.Loader(cfg, mesh, rules)
  step = step_lib.compile_train_step(tasks.get(cfg).make_train_step(cfg, graphdef, tx, schedule), mesh, rules,
                                     shardings, loader.shardings(pipeline.batch_spec(cfg)))
  return types.SimpleNamespace(graphdef=graphdef, state=state_lib.create(init, shardings), step=step,
                               loader=loader, mesh=mesh)


def restore_run(workdir, step):
  """The train state a `jaxvid train` run saved at `step` in `workdir`, on the mesh of its config."""
  from jaxvid import config
  from jaxvid.parallel import mesh as mesh_lib
  from jaxvid.parallel import sharding
  from jaxvid.train import checkpoint as ckpt_lib
  from jaxvid.train import state as state_lib
  cfg = config.from_json(open(os.path.join(workdir, "config.json")).read())
  mesh = mesh_lib.make_mesh(cfg)
  tx, _ = state_lib.make_optimizer(cfg)
  _, _, abstract = state_lib.abstract_state(cfg, tx)
  target = ckpt_lib.with_shardings(abstract, state_lib.state_shardings(abstract, mesh, sharding.rules_from_config(cfg)))
  ckpt = ckpt_lib.Checkpointer(str(workdir))
  state = ckpt.restore(step, target)
  ckpt.close()
  return state


def run_local(processes: int, devices: int, args: list[str], log_dir, timeout: float = 420, env=None):
  """`launch/local.sh PROCESSES DEVICES python -m jaxvid ARGS` -> (returncode, process 0's
  output, process 1's log). On a timeout, every jaxvid process of the job prints its threads'
  stacks (`kill -USR1`, see jaxvid/cli.py), the whole job is killed (nothing is left running
  to slow the tests after it) and the test fails showing the stacks."""
  env = {k: v for k, v in (env or os.environ).items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
  env["JAXVID_LOG_DIR"] = str(log_dir)
  proc = subprocess.Popen([os.path.join(REPO, "launch", "local.sh"), str(processes), str(devices), sys.executable,
                           "-m", "jaxvid", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  log = lambda: "".join(open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir))
                        if f.startswith("process_"))
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    for pid in _session_pids(proc.pid):
      try:
        if b"\0-m\0jaxvid\0" in open(f"/proc/{pid}/cmdline", "rb").read():
          os.kill(pid, signal.SIGUSR1)
      except OSError:          # it ended meanwhile
        pass
    time.sleep(3)
    _kill_session(proc)
    out, _ = proc.communicate()
    pytest.fail(f"launch/local.sh {processes} {devices} {' '.join(args[:1])} still running after {timeout} s; "
                f"stacks follow.\n--- process 0 ---\n{out}\n--- other processes ---\n{log()}")
  except BaseException:        # an interrupted test run: the job is in its own session, Ctrl-C missed it
    _kill_session(proc)
    raise
  return proc.returncode, out, log()


def _kill_session(proc) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except OSError:
    pass


def _session_pids(sid: int) -> list[int]:
  """Processes of session `sid` (Linux /proc), this one's children by `start_new_session`."""
  pids = []
  for name in os.listdir("/proc"):
    try:
      if name.isdigit() and int(open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()[3]) == sid:
        pids.append(int(name))
    except (OSError, IndexError, ValueError):
      pass
  return pids
