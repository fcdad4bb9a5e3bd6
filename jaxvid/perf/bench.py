"""`jaxvid bench`: how fast one config trains and samples on this machine, in one run.

  jaxvid bench --config configs/bench_cpu.py
  jaxvid bench --config configs/dit.py:B --config.train.batch_size=8 --config.model.attention=xla

Builds the config's train state on its mesh, compiles the real train step (train.steps_per_call
steps a call, timed per step) and the model's forward pass (what one sampling step evaluates,
per pass of classifier-free guidance; timed as the sampler runs it, SAMPLING_STEPS Euler steps
in one program, per step), runs each on random data of the config's shapes, and reports
median seconds after warm-up, tokens per second, analytic model FLOPs (perf/flops.py), the
device's peak matmul throughput timed in the same run, MFU, and peak memory per device; with
--profile DIR, also where the time of a traced call went (matmuls, collectives, the rest;
perf/profile.py). Prints a table, then one JSON object as the last line (machine-readable,
for comparing runs); with --baseline FILE, an earlier run's figures beside these first, and
exit status REGRESSED if one got worse by more than --tolerance (perf/compare.py).
"""

import json
import logging
import os
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvid import config as config_lib
from jaxvid.data import pipeline
from jaxvid.diffusion import samplers
from jaxvid.errors import UserError
from jaxvid.models import autoencoder
from jaxvid.models import layers
from jaxvid.models import text
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.perf import compare
from jaxvid.perf import flops as flops_lib
from jaxvid.perf import profile as profile_lib
from jaxvid.train import state as state_lib
from jaxvid.train import step as step_lib

log = logging.getLogger("jaxvid")
# Sampling steps per timed call of the forward (see `run`).
SAMPLING_STEPS = 4
# `jaxvid bench --baseline`'s exit status when a figure got worse (1 stays "it crashed").
REGRESSED = 3


def step_times(fn, steps: int, warmup: int) -> list[float]:
  """Wall seconds of each of `steps` calls of fn() (which must block until its result is
  ready), after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _median_time(fn, steps: int, warmup: int) -> float:
  return statistics.median(step_times(fn, steps, warmup))


def per_step_times(fn, per_call: int, steps: int, warmup: int) -> list[float]:
  """Seconds per step of each timed call of fn(), a call of `per_call` steps: enough calls to
  cover `steps` timed steps (at least one) after enough untimed ones to cover `warmup` steps."""
  calls = lambda n: -(-n // per_call)
  return [t / per_call for t in step_times(fn, max(1, calls(steps)), calls(warmup))]


def _per_step(fn, per_call: int, steps: int, warmup: int) -> float:
  """Median of `per_step_times`."""
  return statistics.median(per_step_times(fn, per_call, steps, warmup))


def peak_matmul_flops(dtype, size: int | None = None, steps: int = 5) -> float:
  """FLOP/s of square matmuls in `dtype`, one on each of this process's devices at the same time,
  summed; median of `steps`. Simulated CPU devices share the host's cores, so on a CPU this is
  the host's throughput whatever the device count; on accelerators, one device's times their count.
  The product is the one the model's dense layers run (`layers.dot_general`: on CPU, low-precision
  inputs accumulate into float32)."""
  devices = jax.local_devices()
  # On a CPU 2048^3 per device, 1024^3 from 4 devices (they share the cores); else 8192^3 a device.
  size = size or (2048 // round(len(devices) ** (1 / 3)) if jax.default_backend() == "cpu" else 8192)
  sharded = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)), jax.sharding.PartitionSpec("d"))
  shape = (len(devices), size, size)
  make = jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32).astype(dtype), out_shardings=sharded)
  a, b = make(jax.random.key(0)), make(jax.random.key(1))
  # Several products in one program, so dispatch overhead does not count on fast devices.
  reps = 1 if jax.default_backend() == "cpu" else 10
  batched = (((2,), (1,)), ((0,), (0,)))                                     # "nij,njk->nik"
  mm = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda i, c: layers.dot_general(c, b, batched) * 0.5, a),
               out_shardings=sharded)
  seconds = _median_time(lambda: mm(a, b).block_until_ready(), steps, warmup=2)
  return 2.0 * size ** 3 * reps * len(devices) / seconds


def random_batch(cfg: ml_collections.ConfigDict, shardings: dict) -> dict:
  """A global batch of the video.* shape with random pixels and tokens."""
  spec = pipeline.batch_spec(cfg)
  rng = np.random.default_rng(cfg.seed)
  vocab = text.vocab_size(cfg)
  host = {"video": rng.integers(0, 256, spec["video"].shape, np.uint8),
          "tokens": rng.integers(2, vocab, spec["tokens"].shape).astype(np.int32),
          "skipped": np.zeros(spec["skipped"].shape, np.int32)}
  return {k: jax.device_put(v, shardings[k]) for k, v in host.items()}


def _memory(compiled) -> int:
  """Peak bytes per device: the allocator's high-water mark where the platform reports one,
  else XLA's memory analysis of the compiled step (arguments + outputs + temporaries)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


class TrainCall:
  """The real train step of `cfg` on `mesh`, compiled for train.steps_per_call steps a call as
  `jaxvid train` runs them, on a random batch (the same one each step); calling it runs one
  call and waits for it. `.compiled`, `.compile_s`, `.per_call`, `.graphdef`, `.batch`, and
  `.state` (the current one: a call donates it and keeps the next)."""

  def __init__(self, cfg: ml_collections.ConfigDict, mesh, rules: sharding.Rules):
    tx, schedule = state_lib.make_optimizer(cfg)
    self.graphdef, init, abstract = state_lib.abstract_state(cfg, tx)
    shardings = state_lib.state_shardings(abstract, mesh, rules)
    self.state = state_lib.create(init, shardings)
    batch_shardings = {k: mesh_lib.batch_sharding(mesh, rules, len(v.shape)) for k, v in pipeline.batch_spec(cfg).items()}
    self.batch = random_batch(cfg, batch_shardings)
    self.ae_params = autoencoder.make(cfg).load(mesh)   # the step encodes pixels with it (none in pixel space)
    self.per_call = cfg.train.steps_per_call
    self.args = step_lib.call_batches(self.batch, self.per_call)
    t0 = time.perf_counter()
    step = step_lib.compile_train_step(step_lib.make_train_step(cfg, self.graphdef, tx, schedule), mesh, rules,
                                       shardings, batch_shardings, self.ae_params, self.per_call)
    self.compiled = step.lower(self.state, self.args, self.ae_params).compile()
    self.compile_s = time.perf_counter() - t0

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, self.args, self.ae_params)
    jax.block_until_ready(metrics["loss"])


def run(cfg: ml_collections.ConfigDict, steps: int = 10, warmup: int = 2, profile_dir: str | None = None) -> dict:
  """Measures the train step and the sampling forward of `cfg`; returns the figures. With
  `profile_dir`, one more train call and forward call are traced there (train/, forward/) and
  the result gets "profile": where their time went (perf/profile.py)."""
  config_lib.validate(cfg, jax.device_count(), train=True)
  if cfg.model.name != "dit":
    raise UserError(f"jaxvid bench times the diffusion transformer; for model.name={cfg.model.name!r} run "
                    "scripts/bench_vae.py")
  mesh = mesh_lib.make_mesh(cfg)
  rules = sharding.rules_from_config(cfg)
  # train.steps_per_call steps a call, as `jaxvid train` runs them (the same batch each step here).
  train = TrainCall(cfg, mesh, rules)
  train_s = _per_step(train, train.per_call, steps, warmup)
  profiles = {}
  if profile_dir:
    profiles["train"] = profile_lib.breakdown(profile_lib.trace(train, os.path.join(profile_dir, "train")),
                                              train.compiled.as_text())
  memory = _memory(train.compiled)

  # The sampling step's work: one model evaluation of the batch (guidance doubles the batch), run
  # as `jaxvid sample` runs it: SAMPLING_STEPS Euler steps chained in one program (the sampler's
  # fori_loop), timed per step. A program allocates its scratch memory once per call (on CPU,
  # fresh pages each time), so one forward per call would also time that allocation.
  b = cfg.train.batch_size

  def sampling_steps(params, x, tokens):
    with sharding.activation_rules(mesh, rules):
      model = nnx.merge(train.graphdef, params)
      emb, mask = model.encode_text(tokens)
      ts = jnp.broadcast_to(jnp.linspace(1.0, 0.0, SAMPLING_STEPS + 1), (x.shape[0], SAMPLING_STEPS + 1))
      return samplers.Euler(SAMPLING_STEPS).sample(lambda x, t: model(x, t, emb, mask), x, ts)

  x = jax.device_put(jnp.zeros((b, *config_lib.latent_shape(cfg)), jnp.float32), mesh_lib.batch_sharding(mesh, rules, 5))
  tokens = jax.device_put(train.batch["tokens"], mesh_lib.batch_sharding(mesh, rules, 2))
  params = train.state.params
  t0 = time.perf_counter()
  fwd = jax.jit(sampling_steps).lower(params, x, tokens).compile()
  forward_compile_s = time.perf_counter() - t0
  one_call = lambda: fwd(params, x, tokens).block_until_ready()
  forward_s = _per_step(one_call, SAMPLING_STEPS, steps, warmup)
  if profile_dir:
    profiles["forward"] = profile_lib.breakdown(profile_lib.trace(one_call, os.path.join(profile_dir, "forward")),
                                                fwd.as_text())

  model_flops = flops_lib.count(cfg, b)
  peak = peak_matmul_flops(jnp.dtype(cfg.model.dtype)) * jax.process_count()   # processes alike
  tokens_per_step = b * config_lib.num_tokens(cfg)
  num_params = sum(x.size for x in jax.tree.leaves(train.state.params))
  device = jax.devices()[0]
  return {
      "config": {"width": cfg.model.width, "depth": cfg.model.depth, "heads": cfg.model.heads,
                 "mlp_dim": cfg.model.mlp_dim, "tokens_per_clip": config_lib.num_tokens(cfg), "batch": b,
                 "dtype": cfg.model.dtype, "attention": cfg.model.attention, "remat": cfg.model.remat,
                 "scan_unroll": cfg.model.scan_unroll,
                 "mesh": dict(mesh.shape)},
      "params": int(num_params),
      "compile_s": train.compile_s,
      "forward_compile_s": forward_compile_s,
      "train_step_s": train_s,
      "train_steps_per_call": train.per_call,
      "forward_s": forward_s,
      "forward_steps_per_call": SAMPLING_STEPS,
      "tokens_per_s": tokens_per_step / train_s,
      "flops_per_step": model_flops.train,
      "forward_flops": model_flops.forward,
      "peak_flops": peak,
      "mfu": model_flops.train / train_s / peak,
      "forward_mfu": model_flops.forward / forward_s / peak,
      "peak_memory_bytes": memory,
      "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
      "host": platform.node(),
      "jax": jax.__version__,
      "time": time.time(),
      **({"profile": profiles, "profile_dir": os.path.abspath(profile_dir)} if profiles else {}),
  }


def table(r: dict) -> str:
  rows = [("compile (train step)", f"{r['compile_s']:.1f} s"),
          ("train step", f"{r['train_step_s'] * 1e3:.1f} ms"),
          ("forward (sampling step)", f"{r['forward_s'] * 1e3:.1f} ms"),
          ("tokens / s (train)", f"{r['tokens_per_s']:,.0f}"),
          ("model FLOPs / train step", f"{r['flops_per_step'] / 1e9:,.2f} GFLOP"),
          ("peak matmul (measured)", f"{r['peak_flops'] / 1e12:,.3f} TFLOP/s"),
          ("MFU train / forward", f"{100 * r['mfu']:.1f} % / {100 * r['forward_mfu']:.1f} %"),
          ("peak memory / device", f"{r['peak_memory_bytes'] / 2**20:,.1f} MiB"),
          ("parameters", f"{r['params'] / 1e6:.2f} M"),
          ("device", r["device"])]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(cfg: ml_collections.ConfigDict, steps: int, profile_dir: str | None = None,
         baseline: tuple[str, dict] | None = None, tolerance: float = compare.TOLERANCE) -> int:
  """Runs, prints the table (and the profile, and on process 0 the comparison with `baseline`,
  (file, result) of an earlier run: perf/compare.py), then the JSON line; returns the exit
  status: REGRESSED where a metric grew past the baseline by more than `tolerance`, else 0."""
  result = run(cfg, steps=steps, profile_dir=profile_dir)
  print(table(result))
  per_call = result["train_steps_per_call"]
  calls = {"train": "train step" if per_call == 1 else f"train ({per_call} steps in one call)",
           "forward": f"forward ({SAMPLING_STEPS} sampling steps in one call)"}
  for name, b in result.get("profile", {}).items():
    print(profile_lib.table(f"{calls[name]}, op time by kind (trace in {result['profile_dir']}/{name})", b))
  c = None
  if baseline is not None and jax.process_index() == 0:
    path, before = baseline
    c = compare.compare(before, result, tolerance)
    print(compare.table(c))
    result["baseline"] = {"file": os.path.abspath(path), **c}
  print(json.dumps(result, sort_keys=True))
  if c and c["regressed"]:
    changes = ", ".join(f"{k} {100 * c['metrics'][k]['change']:+.1f} %" for k in c["regressed"])
    log.error("bench: worse than the baseline %s by more than %g %%: %s", baseline[0], 100 * tolerance, changes)
    return REGRESSED
  return 0
