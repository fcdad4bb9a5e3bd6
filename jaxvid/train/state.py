"""The train state and how it is created, already sharded.

TrainState is a pytree of arrays: parameters, optimizer state and EMA parameters (all
`nnx.State` trees that keep the parameters' logical axis names), plus the step. The model's
structure (`nnx.GraphDef`) stays outside, static.
"""

import re

import flax.struct
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from jaxvid.errors import UserError
from jaxvid.models import dit
from jaxvid.models import vae
from jaxvid.parallel import sharding

# model.name -> build(cfg, seed) -> nnx.Module
MODELS = {"dit": dit.build, "vae": vae.build}


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 [], updates done
  params: nnx.State
  opt_state: optax.OptState
  ema: nnx.State


def param_path(keys) -> str:
  """The path of a parameter as `frozen_mask` matches it: "encoder/conv_in/kernel"."""
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys]
  return "/".join(names[:-1] if names and names[-1] == "value" else names)


def frozen_mask(cfg: ml_collections.ConfigDict, params):
  """A tree like `params` of bools: True for the parameters `optim.frozen` names (all False when
  it is empty). A pattern that names none or all of them is an error."""
  pattern = cfg.optim.frozen
  mask = jax.tree_util.tree_map_with_path(lambda k, _: bool(pattern) and re.search(pattern, param_path(k)) is not None,
                                          params)
  if pattern and (not any(jax.tree.leaves(mask)) or all(jax.tree.leaves(mask))):
    example = param_path(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
    raise UserError(f"optim.frozen={pattern!r} matches {'no' if not any(jax.tree.leaves(mask)) else 'every'} "
                    f"parameter; it is searched in paths like {example!r}")
  return mask


def stop_frozen(mask, params):
  """`params` with the gradient stopped at the frozen ones (nothing is computed for them)."""
  return jax.tree.map(lambda f, p: jax.lax.stop_gradient(p) if f else p, mask, params)


def update_ema(ema, params, decay: jax.Array, mask):
  """decay * ema + (1 - decay) * params, leaving the EMA of frozen parameters exactly as it is."""
  return jax.tree.map(lambda f, e, p: e if f else decay * e + (1 - decay) * p, mask, ema, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then cosine decay, after global-norm clipping; with `optim.frozen`
  the frozen parameters get zero updates (their Adam moments stay zero: their gradients are)."""
  o = cfg.optim
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=min(o.warmup_steps, cfg.train.steps),
      decay_steps=max(cfg.train.steps, o.warmup_steps + 1), end_value=o.lr * o.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2 and p.shape[-1] > 1, params)
  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
  if o.frozen:   # last in the chain: updates (weight decay included) of frozen parameters are zero
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), lambda params: frozen_mask(cfg, params)))
  return tx, schedule


def restart_schedule(opt_state, step: jax.Array):
  """opt_state with the learning-rate schedule's count set to `step` (int32 []): a run that
  takes another's optimizer state keeps its Adam moments (and their bias correction) but runs
  its own schedule, the one `schedule(state.step)` logs. (A copy of `step` each: a step
  donates the whole state, and a buffer cannot be donated twice.)"""
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(lambda x: x._replace(count=step.astype(x.count.dtype).copy()) if is_schedule(x) else x,
                      opt_state, is_leaf=is_schedule)


def abstract_model(cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's structure and its parameters as shapes only (no memory used)."""
  model = nnx.eval_shape(lambda: MODELS[cfg.model.name](cfg, cfg.seed))
  return nnx.split(model, nnx.Param)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules: sharding.Rules):
  return sharding.tree_shardings(nnx.get_partition_spec(abstract_params), mesh, rules)


def abstract_state(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  """(graphdef, init, abstract TrainState): shapes only; `init()` builds the real state."""
  graphdef, _ = abstract_model(cfg)

  def init() -> TrainState:
    _, params = nnx.split(MODELS[cfg.model.name](cfg, cfg.seed), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=params)

  return graphdef, init, jax.eval_shape(init)


def create(init, shardings) -> TrainState:
  """Runs `init` compiled with `out_shardings`: every array is created in place on its
  devices, so no device ever holds a full copy of a sharded parameter."""
  return jax.jit(init, out_shardings=shardings)()


def state_shardings(abstract: TrainState, mesh: Mesh, rules: sharding.Rules):
  """Shardings of every leaf: parameters and their optimizer moments by their logical axes,
  scalars (step, counts) replicated."""
  return sharding.tree_shardings(nnx.get_partition_spec(abstract), mesh, rules)
