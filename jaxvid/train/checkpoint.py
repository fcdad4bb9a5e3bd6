"""Orbax checkpoints of a run: WORKDIR/checkpoints/<step>/{state, data, config}.

  state   the TrainState (params, optimizer state, EMA, step), restored straight into its
          target shardings (no gather to one host)
  data    the grain iterator state, so a resumed run sees the batches it would have seen
  config  the run's resolved config as JSON

Saving is asynchronous: training continues while a checkpoint is written. Orbax writes each
step to a temporary folder and renames it when complete, so an interrupted save is never
picked for resume.
"""

import glob
import json
import logging
import os
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from jaxvid import config as config_lib
from jaxvid.errors import UserError

log = logging.getLogger("jaxvid")
# Orbax writes this file last, after every item of a step is on disk.
COMMIT_MARKER = "commit_success.txt"
# An array replicated over devices is written in slices, one per replica (orbax's replica-parallel
# save), only where each slice is at least this big: every slice is a small program to compile
# and run, which cost more than it saved on small arrays (on 8 CPU devices the first save of a
# tiny model took 12 s, nearly all slicing; two checkpointing tests 110 -> 94 s). Arrays of at
# least this size times their replica count are still written by all their replicas. The rest
# of orbax's default jax.Array handler is kept (its array metadata store; orbax 0.12 has no
# public name for it, so without that module the default handler stays).
MIN_REPLICA_SLICE_BYTES = 4 << 20


def _register_array_handler() -> None:
  try:
    from orbax.checkpoint._src.metadata import array_metadata_store
  except ImportError:
    return
  handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                                           array_metadata_store=array_metadata_store.Store())
  absl_log = logging.getLogger("absl")      # orbax warns about any override
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_log.setLevel(level)


_register_array_handler()


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs that carry their target sharding, for restoring in place."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _shared_data_state(data_dir: str) -> dict:
  """The data iterator state that every process of the run that wrote `data_dir` saved: the
  position in the sequence of global batches, which does not depend on the process count (each
  process reads its own block of every global batch). UserError if they differ."""
  files = sorted(glob.glob(os.path.join(data_dir, "process_*-of-*.json")))
  if not files:
    raise UserError(f"{data_dir} holds no data iterator state; resume from another checkpoint or start a new run")
  states = set()
  for path in files:
    with open(path) as f:
      states.add(f.read().strip())
  if len(states) != 1:
    raise UserError(f"{data_dir}: the {len(files)} processes that wrote it saved different data positions; "
                    f"resume with {len(files)} processes")
  log.info("data position from a checkpoint of %d processes, resumed by %d", len(files), jax.process_count())
  return json.loads(states.pop())


class Checkpointer:
  """One CheckpointManager per run directory."""

  def __init__(self, workdir: str, keep: int = 3, keep_every: int = 0, async_save: bool = True):
    """Keeps the last `keep` checkpoints, plus every `keep_every`-th step if > 0."""
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data", "config"))

  @classmethod
  def of_run(cls, workdir: str) -> "Checkpointer":
    """The checkpoints of another run, to read from: UserError if it has none, and nothing is
    created in its directory."""
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
      raise UserError(f"no checkpoint in {directory}; train first (jaxvid train ...)")
    return cls(workdir)

  def _complete(self, step: int) -> bool:
    return os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER))

  def all_steps(self) -> list[int]:
    """Steps whose checkpoint was written to the end (an interrupted save is never listed)."""
    return sorted(s for s in self.manager.all_steps() if self._complete(s))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    for s in self.manager.all_steps():
      if not self._complete(s):
        log.warning("skipping incomplete checkpoint %s/%d (no %s); it is left in place",
                    self.directory, s, COMMIT_MARKER)
    return steps[-1] if steps else None

  def save(self, step: int, state, data_iterator, cfg: ml_collections.ConfigDict) -> None:
    """Starts saving `step` (in the background when async); `wait()` blocks until written."""
    folder = os.path.join(self.directory, str(step))
    if os.path.exists(folder) and not self._complete(step):   # set aside, never deleted
      os.replace(folder, f"{folder}.incomplete-{int(time.time())}")
      self.manager.reload()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(cfg.to_dict())), force=True)

  def saved_config(self, step: int) -> ml_collections.ConfigDict:
    """The config stored with `step`."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable folders.
      raise UserError(f"checkpoint {self.directory}/{step} cannot be read ({type(e).__name__}: {e}); "
                      "it is corrupt or not a jaxvid checkpoint") from e
    return config_lib.from_json(json.dumps(restored.config))

  def check_compatible(self, step: int, cfg: ml_collections.ConfigDict) -> None:
    saved = self.saved_config(step)
    if config_lib.model_hash(saved) != config_lib.model_hash(cfg):
      diffs = config_lib.model_diffs(saved, cfg)
      raise UserError(f"{self.directory}/{step} holds a different model ({diffs}); "
                      "use a new --workdir or the same model config")

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state (and the data iterator, if given) saved at `step`. The iterator's
    state is saved per process (grain); a run resumed with another process count takes the
    position they all share (see `_shared_data_state`)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    data_dir = os.path.join(self.directory, str(step), "data")
    own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    shared = data_iterator is not None and not os.path.isfile(own)
    if data_iterator is not None and not shared:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model: {e}") from e
    if shared:
      data_iterator.set_state(_shared_data_state(data_dir))
      data_iterator.start_prefetch()        # as grain's own restore does
    return state

  def restore_params(self, step: int, abstract_params, which: str = "ema"):
    """Restores only `which` ("ema" or "params") of the state at `step`, in place."""
    args = ocp.args.PyTreeRestore(
        item={which: abstract_params},
        restore_args={which: ocp.checkpoint_utils.construct_restore_args(abstract_params)},
        partial_restore=True)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=args)).state
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model: {e}") from e
    return restored[which]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
