"""The trainer, top to bottom: mesh, input, model and state, step, checkpoint, loop.

  jaxvid train --config configs/tiny.py --workdir runs/tiny
  jaxvid train --config configs/vae.py --workdir runs/vae

One trainer for every model family; what differs (the step, evaluation, files kept beside the
parameters) comes from the family's task (tasks.py), chosen by `model.name`.
"""

import logging
import os
import time

import jax
import ml_collections
import tqdm

from jaxvid import config as config_lib
from jaxvid.data import pipeline
from jaxvid.errors import UserError
from jaxvid.models import autoencoder
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import export as export_lib
from jaxvid.train import metrics as metrics_lib
from jaxvid.train import preemption
from jaxvid.train import state as state_lib
from jaxvid.train import step as step_lib
from jaxvid.train import tasks

log = logging.getLogger("jaxvid")


def prepare_workdir(cfg: ml_collections.ConfigDict, workdir: str, ae) -> ckpt_lib.Checkpointer:
  """Checks that `workdir` is new or holds this model, then writes config.json.

  Nothing in an existing workdir is touched before the checks pass. The config.json of a
  different model is replaced only where a start failed before its first step.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} exists and is not a directory")
  if export_lib.is_export(workdir):
    raise UserError(f"--workdir {workdir} is an export; train in a new --workdir (--init_from {workdir} "
                    "starts from its parameters)")
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      try:
        saved = config_lib.from_json(f.read())
      except (ValueError, UserError) as e:
        raise UserError(f"{config_path} is not a jaxvid config ({e}); use a new --workdir") from e
    if config_lib.model_hash(saved) != config_lib.model_hash(cfg):
      if not _left_by_a_failed_start(workdir):
        raise UserError(f"{workdir} holds a run of a different model ({config_lib.model_diffs(saved, cfg)}); "
                        "use a new --workdir or the same model config")
      log.warning("%s: config.json of a run that never logged or saved a step (%s); replacing it",
                  workdir, config_lib.model_diffs(saved, cfg))
  os.makedirs(workdir, exist_ok=True)
  c = cfg.checkpoint
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=c.keep, keep_every=c.keep_every, async_save=c.async_save)
  latest = checkpointer.latest_step()
  if latest is not None:
    checkpointer.check_compatible(latest, cfg)
    autoencoder.check_record(ae, workdir)     # a resumed run stays in the latents of its VAE
  if jax.process_index() == 0:
    with open(config_path + ".tmp", "w") as f:
      f.write(config_lib.to_json(cfg))
    os.replace(config_path + ".tmp", config_path)
  return checkpointer


def _left_by_a_failed_start(workdir: str) -> bool:
  """Whether `workdir` holds only what a start that failed before its first step (a bad
  --init_from, bad data) leaves: config.json, an empty checkpoints/ and metrics.jsonl, the
  autoencoder record, TensorBoard's folder."""
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if name in ("config.json", autoencoder.RECORD, "tensorboard"):
      continue
    if name == "checkpoints" and os.path.isdir(path) and not os.listdir(path):
      continue
    if name == "metrics.jsonl" and os.path.isfile(path) and os.path.getsize(path) == 0:
      continue
    return False
  return True


def init_from_run(state: state_lib.TrainState, path: str, cfg: ml_collections.ConfigDict, graphdef, abstract,
                  shardings, with_optimizer: bool) -> state_lib.TrainState:
  """A fresh state whose parameters (and EMA, and optionally optimizer state) come from the
  latest checkpoint of the run directory `path`, or from the export `path`; step stays 0. The
  model family's task adapts them to this run (a VAE trained on images is inflated to clips)."""
  source = os.path.join(path, "config.json")
  if not os.path.isfile(source):
    raise UserError(f"--init_from {path}: no config.json; give a run directory or an export")
  with open(source) as f:
    source_cfg = config_lib.from_json(f.read())
  if config_lib.model_hash(source_cfg) != config_lib.model_hash(cfg):
    raise UserError(f"--init_from {path} is a different model; its model and text config must match")
  target = ckpt_lib.with_shardings(abstract, shardings)
  adapt = tasks.get(cfg).adapt_init(source_cfg, cfg, graphdef)
  if adapt is not None and with_optimizer:
    raise UserError(f"--init_from {path}: its parameters are changed to fit this run (a VAE trained on images "
                    "goes to clips), so its optimizer state does not fit them; drop --init_optimizer")
  adapt = adapt or (lambda params: params)
  if export_lib.is_export(path):
    if with_optimizer:
      raise UserError(f"--init_from {path} is an export, which has no optimizer state; drop --init_optimizer")
    params, step = export_lib.restore(path, cfg, target.params)
    ema = jax.tree.map(lambda p: p.copy(), params)     # its own buffers: the step donates both trees
  elif with_optimizer:
    if source_cfg.optim.get("frozen", "") != cfg.optim.frozen:
      raise UserError(f"--init_from {path} --init_optimizer: its optim.frozen differs from this run's, so its "
                      "optimizer state does not fit; drop --init_optimizer or give the same optim.frozen")
    checkpointer = ckpt_lib.Checkpointer.of_run(path)
    step = checkpointer.latest_step()
    if step is None:
      raise UserError(f"--init_from {path}: no checkpoint in {checkpointer.directory}")
    restored = checkpointer.restore(step, target)
    checkpointer.close()
    log.info("initialized parameters, EMA and optimizer state from %s at step %d; the learning-rate "
             "schedule starts over at this run's step 0", path, step)
    return restored.replace(step=state.step, opt_state=state_lib.restart_schedule(restored.opt_state, state.step))
  else:
    params, step = export_lib.load_params(path, cfg, target.params, which="params")
    ema, _ = export_lib.load_params(path, cfg, target.ema, step, which="ema")
  log.info("initialized parameters and EMA from %s at step %d", path, step)
  params, ema = adapt(params), adapt(ema)
  # Frozen parameters (optim.frozen) are the source's EMA, the weights it is evaluated and exported with
  # (a copy: the step donates both trees).
  params = jax.tree.map(lambda f, p, e: e.copy() if f else p, state_lib.frozen_mask(cfg, params), params, ema)
  return state.replace(params=params, ema=ema)


def _shapes(batch: dict) -> tuple:
  """The key of a batch's compiled step: the shape of each of its arrays."""
  return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))


def _describe(spec: dict) -> str:
  x = spec.get("video", spec.get("latents"))
  return f"{x.shape[0]} x {'x'.join(map(str, x.shape[1:4]))}"


def train(cfg: ml_collections.ConfigDict, workdir: str, init_from: str | None = None,
          init_optimizer: bool = False) -> None:
  config_lib.validate(cfg, jax.device_count(), train=True)
  ae = autoencoder.make(cfg)           # the latents' autoencoder (identity: pixels)
  checkpointer = prepare_workdir(cfg, workdir, ae)

  # Mesh and input.
  mesh = mesh_lib.make_mesh(cfg)
  rules = sharding.rules_from_config(cfg)
  loader = pipeline.Loader(cfg, mesh, rules)
  log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

  # Model, optimizer and state: created sharded, or restored in place.
  task = tasks.get(cfg)
  tx, schedule = state_lib.make_optimizer(cfg)
  graphdef, init, abstract = state_lib.abstract_state(cfg, tx)
  shardings = state_lib.state_shardings(abstract, mesh, rules)
  latest = checkpointer.latest_step()
  if latest is None:
    state = state_lib.create(init, shardings)
    if init_from:
      state = init_from_run(state, init_from, cfg, graphdef, abstract, shardings, init_optimizer)
  else:
    if init_from:
      log.warning("%s has checkpoints: resuming it, --init_from is ignored", workdir)
    state = checkpointer.restore(latest, ckpt_lib.with_shardings(abstract, shardings), loader.iterator)
    log.info("resumed from %s/%d", checkpointer.directory, latest)
  log.info("model: %s", task.describe(cfg, sum(x.size for x in jax.tree.leaves(abstract.params))))
  # The autoencoder's parameters (none in pixel space), on the mesh: an argument of every step.
  if latest is None and jax.process_index() == 0:
    autoencoder.record(ae, workdir)     # which VAE this run's latents come from
  ae_params = ae.load(mesh)

  # The step, compiled ahead of time once per bucket shape: train.steps_per_call steps in one
  # program, and one step where a call can fall short (see below).
  per_call = cfg.train.steps_per_call
  make_step = task.make_train_step(cfg, graphdef, tx, schedule)
  batch_shardings = loader.shardings(loader.specs[0])
  specs = {_shapes(spec): spec for spec in loader.specs}
  programs, batch_tokens = {}, {key: task.tokens(cfg, spec) for key, spec in specs.items()}

  def program(key, steps):
    if (key, steps) not in programs:
      t0 = time.time()
      fn = step_lib.compile_train_step(make_step, mesh, rules, shardings, batch_shardings, ae_params, steps)
      programs[key, steps] = fn.lower(state, step_lib.call_batches(specs[key], steps), ae_params).compile()
      log.info("compiled the train step for batches of %s%s in %.1f s", _describe(specs[key]),
               f", {steps} steps a call" if steps > 1 else "", time.time() - t0)
    return programs[key, steps]

  evaluate = task.make_evaluator(cfg, graphdef, mesh, rules)   # None: the family has no evaluation
  # Steps between logging, checkpoint and evaluation points: a call never runs across one.
  points = [cfg.train.log_every, cfg.checkpoint.every] + ([evaluate.every] if evaluate is not None else [])
  start, total = int(state.step), cfg.train.steps
  if start >= total:
    log.info("already at step %d of train.steps=%d: nothing to do", start, total)
    checkpointer.close()
    return
  # Up front, so that no compile lands inside a timed interval: the k-step program where a call
  # can be whole, the single step where a call can fall short (a point, the start or the end not
  # a whole number of calls away, or batches of several buckets).
  whole = per_call > 1 and per_call <= min(points + [total - start])
  short = not whole or len(specs) > 1 or any(x % per_call for x in points + [start, total])
  for key in specs:
    for steps in [per_call] * whole + [1] * short:
      program(key, steps)

  # The loop: calls of up to train.steps_per_call steps.
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start)
  bar = tqdm.tqdm(initial=start, total=total, desc="train", unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  last_time, last_step, saved, tokens, done, calls_made = time.time(), start, start, 0, start, 0
  skipped = loader.skipped_at_start   # files dropped at startup, then those replaced in batches (on device)
  with preemption.StopRequest() as stop:
    while done < total:
      n = min(per_call, total - done, *(every - done % every for every in points))
      batches = [next(loader) for _ in range(n)]
      keys = [_shapes(b) for b in batches]
      if n > 1 and n == per_call and len(set(keys)) == 1:
        calls = [(program(keys[0], n), batches)]
      else:
        calls = [(program(key, 1), b) for key, b in zip(keys, batches)]
      for fn, args in calls:
        state, metrics = fn(state, args, ae_params)
        skipped = skipped + metrics.pop("data/skipped")
      tokens += sum(batch_tokens[key] for key in keys)
      done += n
      evaluating = evaluate is not None and (done % evaluate.every == 0 or done == total)
      if done % cfg.train.log_every == 0 or done == total or evaluating:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        steps_per_sec = (done - last_step) / (now - last_time)
        metrics.update(steps_per_sec=steps_per_sec, tokens_per_sec=tokens / (now - last_time))
        metrics["data/skipped"] = int(skipped)
        if evaluating:
          metrics.update(evaluate(state))
        last_time, last_step, tokens = time.time(), done, 0   # evaluation time is not step time
        writer.write(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_per_s=f"{steps_per_sec:.2f}")
      bar.update(n)
      calls_made += 1
      stopping = stop.should_stop(calls_made)
      if done % cfg.checkpoint.every == 0 or done == total or stopping:
        checkpointer.save(done, state, loader.iterator, cfg)
        saved = done
      if stopping:
        break
    bar.close()
    checkpointer.wait()
  if saved > start:   # e.g. a VAE's latent statistics, for the parameters just saved
    task.finalize(cfg, graphdef, state.ema, saved, workdir, mesh, rules)
  checkpointer.close()
  writer.close()
  if saved < total:
    log.info("stopped at step %d of %d: saved %s/%d; rerun the same command to resume",
             saved, total, checkpointer.directory, saved)
  else:
    log.info("done: step %d, checkpoints in %s", total, checkpointer.directory)
