"""Logical axis names and their mapping to mesh axes.

Code names array axes logically (`EMBED`, `HEADS`, ...); which mesh axes they are split over
is config data (`config.sharding`), so a new parallelism strategy is a config change.
Parameters carry their logical names as flax sharding metadata (`nnx.with_partitioning`);
activations are constrained at block boundaries with `constrain`.
"""

import contextlib
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections

# Parameters.
EMBED = "embed"      # model width D
HEADS = "heads"      # attention heads N
KV = "kv"            # per-head dim
MLP = "mlp"          # hidden width of the MLP
LAYERS = "layers"    # the stacked (scanned) layer axis
VOCAB = "vocab"      # token vocabulary
# Activations.
BATCH = "batch"          # B
LENGTH = "length"        # tokens N of a clip
ACT_EMBED = "act_embed"  # D of activations
ACT_HEADS = "act_heads"  # heads of activations

LOGICAL_AXES = (EMBED, HEADS, KV, MLP, LAYERS, VOCAB, BATCH, LENGTH, ACT_EMBED, ACT_HEADS)

Rules = dict[str, tuple[str, ...]]


def rules_from_config(cfg: ml_collections.ConfigDict) -> Rules:
  """`config.sharding` ("data,fsdp" strings) -> {logical: (mesh axes...)}."""
  rules = {}
  for name in LOGICAL_AXES:
    value = cfg.sharding.get(name, "")
    rules[name] = tuple(a for a in value.split(",") if a)
  return rules


def logical_to_spec(logical: tuple, rules: Rules, mesh: Mesh | None = None) -> P:
  """('batch', None, 'embed') -> P(('data', 'fsdp'), None, 'fsdp') minus axes already used.

  A mesh axis is used at most once per array (the first logical axis that claims it wins),
  and axes of size 1 are dropped so that specs stay readable.
  """
  used, out = set(), []
  for name in logical:
    axes = rules.get(name, ()) if name else ()
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def tree_shardings(logical_specs, mesh: Mesh, rules: Rules):
  """Maps a tree of logical PartitionSpecs (from `nnx.get_partition_spec`) to NamedShardings."""
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(tuple(s), rules, mesh)),
                      logical_specs, is_leaf=lambda x: isinstance(x, P))


_context = threading.local()


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules):
  """Within this context (while tracing), `constrain` places activations on `mesh`."""
  previous = getattr(_context, "value", None)
  _context.value = (mesh, rules)
  try:
    yield
  finally:
    _context.value = previous


def current() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the enclosing `activation_rules`, or None."""
  return getattr(_context, "value", None)


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
  """Sharding constraint by logical axis names; a no-op outside `activation_rules`."""
  ctx = current()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, rules, mesh)))
