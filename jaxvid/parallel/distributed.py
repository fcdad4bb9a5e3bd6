"""Devices: this process's CPU devices, XLA:CPU's options and JAX's own multi-process runtime,
before any device is touched.

Every process of a job runs the same command. Where the cluster is described comes from,
in order: `config.distributed.*`, then the environment (`JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, as `launch/local.sh` sets them), then JAX's own
detection of TPU pods, SLURM and other clusters (`distributed.initialize=on`).

  distributed.initialize  "auto": join when a coordinator is given or SLURM ran several
                          tasks; "on": always (lets JAX detect TPU pods); "off": never
  distributed.cpu_devices CPU devices per process: -1 JAX's own (XLA_FLAGS, JAX_NUM_CPU_DEVICES,
                          else 1); 0 one per usable core, as many as the batch and mesh split over
                          (unless the environment sets a count); N: N
"""

import logging
import os
import socket
import time

import jax
import ml_collections
import numpy as np

from jaxvid import config as config_lib
from jaxvid.errors import UserError

log = logging.getLogger("jaxvid")

# XLA:CPU options set for every jaxvid command, unless XLA_FLAGS already names them. YNNPACK's
# reductions are 4-11x slower than XLA's own on this project's shapes (summing a [2048, 384]
# activation over tokens on one core: 7.1 ms against 0.65 ms); with them off the bench_cpu train
# step is 9-13% faster (README, Performance). XLA only reads XLA_FLAGS when it makes its first
# backend, so this takes effect only before then.
XLA_CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-reduce"}


def _settings(cfg: ml_collections.ConfigDict) -> tuple[str | None, int | None, int | None]:
  d = cfg.distributed
  env = os.environ
  coordinator = d.coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
  num = d.num_processes if d.num_processes > 0 else int(env.get("JAX_NUM_PROCESSES", 0)) or None
  pid = d.process_id if d.process_id >= 0 else int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None
  return coordinator, num, pid


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_device_count(cfg: ml_collections.ConfigDict, cores: int, batch: int | None) -> int:
  """CPU devices for one process under distributed.cpu_devices=0: the largest n <= `cores` that
  splits `batch` (the command's global batch; None: any n) and for which `cfg` is valid on n
  devices (the buckets split into whole shards, the mesh's fixed axis sizes multiply to n);
  1 if none is."""
  for n in range(max(cores, 1), 1, -1):
    if batch is not None and batch % n:
      continue
    try:
      config_lib.validate(cfg, n)
      return n
    except UserError:
      continue
  return 1


def set_xla_cpu_flags() -> None:
  """Adds XLA_CPU_FLAGS to the XLA_FLAGS environment variable, keeping the user's own settings."""
  flags = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in XLA_CPU_FLAGS.items() if name not in flags]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def _make_cpu_devices(cfg: ml_collections.ConfigDict, joining: bool, batch: int | None) -> None:
  """Sets how many CPU devices JAX makes, before it makes any (see distributed.cpu_devices).
  -1 leaves JAX's own count; so does 0 when XLA_FLAGS or JAX_NUM_CPU_DEVICES sets one, or when
  joining a multi-process job."""
  n = cfg.distributed.cpu_devices
  if n < -1:
    raise UserError(f"distributed.cpu_devices={n} must be -1 (JAX's count), 0 (one per core) or a count")
  if n == -1:
    return
  if n == 0:
    chosen = ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
              or jax.config.jax_num_cpu_devices >= 0)
    if chosen or joining:
      log.info("distributed.cpu_devices=0: keeping JAX's CPU device count (%s)",
               "a multi-process job" if joining else "set by XLA_FLAGS or JAX_NUM_CPU_DEVICES")
      return
    cores = usable_cores()
    n = cpu_device_count(cfg, cores, batch)
    log.info("distributed.cpu_devices=0: %d CPU devices on %d cores", n, cores)
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:   # this process already made its devices (jaxvid called from a program that used JAX)
    log.warning("distributed.cpu_devices=%d: JAX's devices already exist in this process; keeping %d CPU devices",
                cfg.distributed.cpu_devices, len(jax.local_devices(backend="cpu")))


def initialize(cfg: ml_collections.ConfigDict, batch: int | None = None) -> None:
  """Makes this process's CPU devices (distributed.cpu_devices) and joins the multi-process job
  if there is one; then checks all processes run `cfg`. `batch`: the command's global batch,
  which distributed.cpu_devices=0 splits evenly (None: the command splits any count)."""
  mode = cfg.distributed.initialize
  if mode not in ("auto", "on", "off"):
    raise UserError(f"distributed.initialize={mode!r} must be 'auto', 'on' or 'off'")
  coordinator, num, pid = _settings(cfg)
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  joining = mode == "on" or (mode == "auto" and (coordinator is not None or slurm_tasks >= 2))
  set_xla_cpu_flags()
  _make_cpu_devices(cfg, joining, batch)
  if not joining:
    return
  if jax.distributed.is_initialized():
    return
  if coordinator is not None and (num is None or pid is None):
    raise UserError(f"coordinator {coordinator} given without the process count and id; set "
                    "JAX_NUM_PROCESSES and JAX_PROCESS_ID (or distributed.num_processes/process_id)")
  timeout = cfg.distributed.timeout_s
  if coordinator is not None and pid != 0:
    # JAX's client aborts the whole process when it cannot register in time; find out first.
    _wait_for(coordinator, timeout)
  # CPU devices of several processes talk through gloo (GPUs and TPUs have their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                               initialization_timeout=timeout)
  except Exception as e:  # JAX raises RuntimeError/ValueError/XlaRuntimeError; one line is enough.
    where = coordinator or "the detected cluster"
    raise UserError(f"could not join the multi-process job at {where} within distributed.timeout_s={timeout} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check that process 0 is "
                    "running and the address and port are reachable") from e
  log.info("process %d of %d (%d local devices, %d in all)", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  check_same_config(cfg)


def _wait_for(address: str, timeout: float) -> None:
  """Returns once a TCP connection to host:port succeeds; UserError after `timeout` seconds."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"coordinator address {address!r} must be HOST:PORT")
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(f"could not join the multi-process job at {address} within distributed.timeout_s="
                        f"{timeout} ({e}); check that process 0 is running and the address and port are "
                        "reachable") from None
      time.sleep(0.5)


def check_same_config(cfg: ml_collections.ConfigDict) -> None:
  """Every process must run the same config (apart from where it sits in the cluster)."""
  if jax.process_count() == 1:
    return
  check_same(config_lib.config_hash(_without_placement(cfg)), "run a different config from process 0; launch "
             "every process with the same --config file and --config.* overrides")


def fail_together(error: Exception | None) -> None:
  """Every process calls this after a step that may fail on some processes only (a file one
  host cannot read, a store only process 0 creates). If any process failed, every process
  raises (its own error, or one naming the processes that failed), so none is left waiting in
  a later collective. A no-op in a one-process job without an error."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    flags = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1).tolist()
    failed = [i for i, f in enumerate(flags) if f]
  else:
    failed = []
  if error is not None:
    raise error
  if failed:
    raise UserError(f"processes {failed} stopped with an error (their logs say which); fix it and rerun")


def max_over_processes(values: np.ndarray) -> np.ndarray:
  """The elementwise max of `values` over all processes (every process must call it; a
  collective, so also a barrier). The array itself in a one-process job."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.max(np.asarray(multihost_utils.process_allgather(values)), axis=0)


def check_same(digest: str, differ_message: str) -> None:
  """Raises UserError("processes [i, ...] " + differ_message) unless every process has the same
  hex `digest` (a no-op in a one-process job)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  value = np.int64(int(digest[:8], 16))
  hashes = np.asarray(multihost_utils.process_allgather(value)).reshape(-1).tolist()
  differ = [i for i, h in enumerate(hashes) if h != hashes[0]]
  if differ:
    raise UserError(f"processes {differ} {differ_message}")


# How a process joins its job: the command's own environment and overrides, never a run's record.
PLACEMENT = ("initialize", "coordinator", "num_processes", "process_id")


def forget_placement(cfg: ml_collections.ConfigDict) -> None:
  """Sets distributed.{initialize, coordinator, num_processes, process_id} of a config read from
  a run's config.json back to the defaults: they record how the training processes joined their
  job (process 0's: process_id=0), while `jaxvid sample` or `export` joins its own, from its
  environment and its own --config.distributed.* overrides."""
  defaults = config_lib.base_config().distributed
  with cfg.unlocked():
    for key in PLACEMENT:
      cfg.distributed[key] = defaults[key]


def _without_placement(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  cfg = config_lib.from_json(config_lib.to_json(cfg))
  with cfg.unlocked():
    cfg.distributed.process_id = -1
  return cfg
