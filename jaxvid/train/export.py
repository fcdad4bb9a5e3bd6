"""Inference-only checkpoints: the EMA parameters and the config, nothing else.

  jaxvid export --workdir runs/tiny --output exports/tiny
  jaxvid sample --workdir exports/tiny --prompt "..." --output out/

Layout of an export folder:
  config.json    the run's resolved config
  export.json    {"step", "model_hash", "source"}
  params/        an Orbax checkpoint of the EMA parameters (restored straight into shardings)
  ...            what the model family keeps beside its parameters (a VAE: latent_stats.json)
  autoencoder.json  a DiT trained in a VAE's latents: which VAE (checked when sampling)
"""

import json
import logging
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxvid import config as config_lib
from jaxvid.errors import UserError
from jaxvid.models import autoencoder
from jaxvid.parallel import distributed
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.train import checkpoint as ckpt_lib
from jaxvid.train import state as state_lib
from jaxvid.train import tasks

log = logging.getLogger("jaxvid")
EXPORT_INFO = "export.json"


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, EXPORT_INFO))


def export(cfg: ml_collections.ConfigDict, params, step: int, source: str, output: str, extras=None) -> None:
  """Writes `params` (EMA, as restored from `source` at `step`) to a new folder `output`;
  `extras(folder)`, run on every process before the folder is complete, adds files to it.
  Every process calls this; process 0 makes the folder, writes the files beside the parameters
  and names it `output` last, and a failure on any process stops all of them."""
  tmp = output.rstrip("/") + ".partial"
  error = None
  if jax.process_index() == 0:     # one process makes the folder; the others wait for it
    if os.path.exists(output):
      error = UserError(f"--output {output} already exists; choose a new path (nothing was overwritten)")
    elif os.path.exists(tmp):
      error = UserError(f"{tmp} exists (an interrupted export?); remove it or choose another --output")
    else:
      try:
        os.makedirs(tmp)
      except OSError as e:
        error = UserError(f"cannot create {tmp} ({e.strerror or e}); choose an --output in a folder you can write")
  distributed.fail_together(error)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(tmp, "params")), params)
  error = None
  try:
    if extras is not None:
      extras(tmp)
    if jax.process_index() == 0:
      with open(os.path.join(tmp, "config.json"), "w") as f:
        f.write(config_lib.to_json(cfg))
      if os.path.isfile(os.path.join(source, autoencoder.RECORD)):   # the VAE it needs, checked at sampling
        shutil.copy(os.path.join(source, autoencoder.RECORD), os.path.join(tmp, autoencoder.RECORD))
      with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
        json.dump({"step": step, "model_hash": config_lib.model_hash(cfg), "source": os.path.abspath(source)}, f)
      os.replace(tmp, output)
  except OSError as e:
    error = UserError(f"cannot write the export in {tmp} ({e.strerror or e}); free space or fix its permissions, "
                      "then remove it and rerun")
  except Exception as e:  # noqa: BLE001 -- raised below, after telling the other processes
    error = e
  distributed.fail_together(error)   # every process ends once the export is complete


def restore(path: str, cfg: ml_collections.ConfigDict, abstract_params) -> tuple[object, int]:
  """(params placed as `abstract_params` says, step) from an export folder."""
  with open(os.path.join(path, EXPORT_INFO)) as f:
    info = json.load(f)
  if info["model_hash"] != config_lib.model_hash(cfg):
    raise UserError(f"{path} was exported from a different model than its config.json describes")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.abspath(os.path.join(path, "params")), abstract_params)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(f"export {path} cannot be restored ({type(e).__name__}: {e})") from e
  return params, info["step"]


def load_params(path: str, cfg: ml_collections.ConfigDict, abstract_params, step: int | None = None,
                which: str = "ema") -> tuple[object, int]:
  """Parameters for sampling from a run directory (its `which` params at `step`, default the
  latest) or from an export folder. Returns (params, step)."""
  if is_export(path):
    if step is not None:
      raise UserError(f"{path} is an export (one step); drop --step")
    if which != "ema":
      raise UserError(f"{path} is an export, which holds the EMA weights only; drop "
                      "--config.sample.use_ema=false, or sample the run directory")
    return restore(path, cfg, abstract_params)
  checkpointer = ckpt_lib.Checkpointer.of_run(path)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise UserError(f"no checkpoint in {checkpointer.directory}; train first (jaxvid train ...)")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise UserError(f"no checkpoint for --step {step}; available: {steps}")
    checkpointer.check_compatible(step, cfg)
    return checkpointer.restore_params(step, abstract_params, which), step
  finally:
    checkpointer.close()


def load_run_config(workdir: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """The config.json of a run directory or an export, with `overrides`. How its processes joined
  their job is forgotten (distributed.forget_placement): a command joins its own."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} not found; --workdir must be a run directory (jaxvid train) or an export (jaxvid export)")
  with open(path) as f:
    cfg = config_lib.from_json(f.read())
  distributed.forget_placement(cfg)
  config_lib.apply_overrides(cfg, list(overrides))
  return cfg


def run_config(workdir: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """The config of the run `jaxvid export` reads (UserError if `workdir` is an export), with
  `overrides` of distributed.* only: how this command joins a multi-process job."""
  if is_export(workdir):
    raise UserError(f"{workdir} is already an export: sample it as it is (jaxvid sample --workdir {workdir}), "
                    "or export the run it came from (its export.json names it)")
  other = [o for o in overrides if not o.startswith("--config.distributed.")]
  if other:
    raise UserError(f"jaxvid export takes the run's config as it is; {other[0].split('=')[0]} cannot be set "
                    "(only --config.distributed.*, how the export joins a multi-process job)")
  return load_run_config(workdir, overrides)


def export_run(cfg: ml_collections.ConfigDict, workdir: str, output: str, step: int | None = None) -> None:
  """`jaxvid export`: the EMA parameters of the run `workdir` (config `cfg`, see `run_config`)
  at `step` (default latest) to `output`. In a multi-process job every process takes part, on
  the devices of all of them; process 0 writes the files beside the parameters."""
  if os.path.exists(output):
    raise UserError(f"--output {output} already exists; choose a new path (nothing was overwritten)")
  # Read on every device of the job, whatever mesh the run trained on (a checkpoint restores
  # onto any mesh): every device holds the parameters whole. The export keeps the run's config.
  here = config_lib.from_json(config_lib.to_json(cfg))
  here.mesh.update({a: 1 for a in here.mesh})
  here.mesh.data = -1
  mesh = mesh_lib.make_mesh(here)     # no batch checks: nothing here is split by batch
  rules = sharding.rules_from_config(here)
  graphdef, abstract = state_lib.abstract_model(cfg)
  target = ckpt_lib.with_shardings(abstract, state_lib.param_shardings(abstract, mesh, rules))
  params, step = load_params(workdir, cfg, target, step, "ema")
  finalize = tasks.get(cfg).finalize
  cfg.sample.use_ema = True      # what an export holds (a run may have sampled its raw parameters)
  export(cfg, params, step, workdir, output,
         extras=lambda folder: finalize(here, graphdef, params, step, folder, mesh, rules, source=workdir))
  log.info("exported the EMA parameters of %s at step %d to %s", workdir, step, output)
