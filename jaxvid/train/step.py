"""The pure train step: (state, batch, ae_params) -> (state, metrics), compiled once with donation.

`ae_params` are the autoencoder's parameters (`autoencoder.make(cfg).load(mesh)`; {} for pixel
space): an argument of the compiled step, so a trained VAE's weights are never baked into it.
"""

import math

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import optax

from jaxvid.data import pipeline
from jaxvid.diffusion import conditioning
from jaxvid.diffusion import flow as flow_lib
from jaxvid.errors import UserError
from jaxvid.models import autoencoder
from jaxvid.models import text
from jaxvid.parallel import mesh as mesh_lib
from jaxvid.parallel import sharding
from jaxvid.train import state as state_lib
from jaxvid.train.state import TrainState


def drop_captions(tokens: jax.Array, rng: jax.Array, rate: float) -> jax.Array:
  """Replaces a `rate` fraction of captions [B, L] by the empty caption [BOS, PAD, ...]."""
  empty = jnp.zeros_like(tokens).at[:, 0].set(text.BOS)
  drop = jax.random.bernoulli(rng, rate, (tokens.shape[0], 1))
  return jnp.where(drop, empty, tokens)


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
  """EMA decay that warms up, so early EMA weights are not stuck at the initialization."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule):
  """Returns train_step(state, batch, ae_params) -> (state, metrics); batch as from `pipeline.Loader`.

  Randomness (caption dropout, flow times, noise, known-part masks) comes from fold_in(seed, step), so a resumed
  run draws exactly what the uninterrupted one would have.
  """
  seed, drop_rate, decay = cfg.seed, cfg.text.drop_rate, cfg.optim.ema_decay
  ae = autoencoder.make(cfg)
  patch = cfg.model.patch
  masks = conditioning.MaskDistribution.from_config(cfg) if cfg.model.condition == "mask" else None

  def train_step(state: TrainState, batch: dict, ae_params) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    rng_drop, rng_flow = jax.random.split(rng)
    tokens = drop_captions(batch["tokens"], rng_drop, drop_rate)
    # Pixels are encoded here; a latent store holds them encoded already.
    x0 = ae.encode(ae_params, batch["video"]) if "video" in batch else batch["latents"].astype(jnp.float32)
    # Each bucket is its own trace, so the time shift follows the bucket's token count.
    flow = flow_lib.Flow.from_config(cfg, math.prod(x0.shape[1:4]) // math.prod(patch))
    # Known parts of each clip (model.condition = "mask"): [B, T, H, W, 1], 1 = given clean.
    known_mask = None if masks is None else masks.sample(jax.random.fold_in(rng, 2), x0.shape[:4])

    frozen = state_lib.frozen_mask(cfg, state.params)   # python bools: optim.frozen

    def loss_fn(params):
      model = nnx.merge(graphdef, state_lib.stop_frozen(frozen, params))
      text_emb, text_mask = model.encode_text(tokens)
      return flow_lib.loss(lambda x, t: model(x, t, text_emb, text_mask, known_mask), x0, rng_flow, flow,
                           known_mask)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(decay, state.step)
    ema = state_lib.update_ema(state.ema, params, d, frozen)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
               "data/skipped": jnp.sum(batch["skipped"])}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

  return train_step


def compile_train_step(train_step, mesh: Mesh, rules: sharding.Rules, state_shardings, batch_shardings,
                       ae_params=None, steps: int = 1):
  """jit of step(state, batch, ae_params) with explicit shardings; the state is donated (updated
  in place). `ae_params` (arrays or shapes) give the autoencoder parameters' shardings.

  steps > 1: step(state, batches, ae_params) takes a list of `steps` batches of one shape and
  runs them back to back in one program (stacked, then a lax.scan of train_step), returning the
  last step's metrics with data/skipped summed over the steps: the same states and metrics as
  `steps` calls (train.steps_per_call).
  """
  ae_shardings = jax.tree.map(lambda a: a.sharding, ae_params or {})

  def step(state, batch, ae_params):
    with sharding.activation_rules(mesh, rules):
      if steps == 1:
        return train_step(state, batch, ae_params)
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
      stacked = jax.lax.with_sharding_constraint(stacked, {k: NamedSharding(mesh, P(None, *s.spec))
                                                           for k, s in batch_shardings.items()})
      state, metrics = jax.lax.scan(lambda st, b: train_step(st, b, ae_params), state, stacked)
      last = jax.tree.map(lambda m: m[-1], metrics)
      return state, {**last, "data/skipped": jnp.sum(metrics["data/skipped"])}

  return jax.jit(step, in_shardings=(state_shardings, call_batches(batch_shardings, steps), ae_shardings),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def call_batches(batch, steps: int):
  """What a step compiled for `steps` steps takes where each of its steps gets `batch` (a batch,
  its shapes or its shardings): the batch itself for one step, else a list of `steps` of it."""
  return batch if steps == 1 else [batch] * steps


def compile_for_mesh(cfg: ml_collections.ConfigDict, mesh: Mesh) -> jax.stages.Compiled:
  """The train step for `cfg` compiled on `mesh` from abstract inputs (nothing is allocated),
  for cost and memory analysis (`.memory_analysis()`, `.cost_analysis()`). A DiT only; a trained
  VAE it works through is read from its checkpoint (small next to the model)."""
  if cfg.model.name != "dit":
    raise UserError(f"compile_for_mesh analyses the DiT's train step, not model.name={cfg.model.name!r}; "
                    "pass a DiT config (configs/tiny.py, configs/dit.py)")
  rules = sharding.rules_from_config(cfg)
  tx, schedule = state_lib.make_optimizer(cfg)
  graphdef, _, abstract = state_lib.abstract_state(cfg, tx)
  shardings = state_lib.state_shardings(abstract, mesh, rules)
  batch = pipeline.batch_spec(cfg)
  batch_shardings = {k: mesh_lib.batch_sharding(mesh, rules, len(v.shape)) for k, v in batch.items()}
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch.items()}
  ae_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                           autoencoder.make(cfg).load(mesh))   # small next to the model; read once here
  step = compile_train_step(make_train_step(cfg, graphdef, tx, schedule), mesh, rules, shardings, batch_shardings,
                            ae_params)
  return step.lower(state, batch, ae_params).compile()
