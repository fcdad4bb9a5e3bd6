"""Context (sequence) parallelism: self-attention over tokens split across the `sequence` axis.

Outside attention, a block is pointwise over tokens, so with `sharding.length="sequence"`
XLA keeps those parts split by token on its own. Attention needs every key for every query;
two explicit schemes, written with `shard_map`, choose how the keys travel:

  ulysses  two all-to-alls: [tokens/S, heads] -> [tokens, heads/S], plain attention over all
           tokens for a slice of the heads, and back. Needs (heads per tensor shard) % S == 0.
  ring     queries stay; key/value blocks go around the ring with `ppermute`, S steps, merged
           with an online softmax. Any head count; memory per device never holds all keys.

Both are exact (up to float rounding) and differentiable, so they serve training and sampling.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxvid.parallel import sharding as sh

SCHEMES = ("ulysses", "ring")


def sequence_axis(mesh: Mesh, rules: sh.Rules) -> str | None:
  """The mesh axis that splits tokens (if it has more than one device), else None."""
  axes = [a for a in rules.get(sh.LENGTH, ()) if mesh.shape[a] > 1]
  if len(axes) > 1:
    raise ValueError(f"sharding.length={','.join(axes)}: tokens can be split over one mesh axis only")
  return axes[0] if axes else None


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, scheme: str, attend) -> jax.Array:
  """attend(q, k, v) for q, k, v [B, N, heads, K] whose N may be split over the sequence axis.

  Uses the mesh and rules of `sharding.activation_rules`; without them, or with one device on
  the sequence axis, this is just `attend(q, k, v)`.
  """
  ctx = sh.current()
  axis = None if ctx is None else sequence_axis(*ctx)
  if axis is None:
    return attend(q, k, v)
  mesh, rules = ctx
  spec = sh.logical_to_spec((sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None), rules, mesh)
  size = mesh.shape[axis]
  if scheme == "ulysses":
    local = functools.partial(_ulysses, axis=axis, attend=attend)
  elif scheme == "ring":
    local = functools.partial(_ring, axis=axis, size=size)
  else:
    raise ValueError(f"context parallel scheme {scheme!r}: one of {SCHEMES}")
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _ulysses(q, k, v, *, axis: str, attend):
  """Local blocks [b, n/S, h, K] -> attention over all n tokens for h/S heads -> [b, n/S, h, K]."""
  to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
  out = attend(to_heads(q), to_heads(k), to_heads(v))                 # [b, n, h/S, K]
  return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring(q, k, v, *, axis: str, size: int):
  """Local q, k, v [b, n/S, h, K]; S steps of blockwise attention with an online softmax."""
  scale = q.shape[-1] ** -0.5
  qf = q.astype(jnp.float32) * scale
  b, n, h, d = q.shape
  perm = [(i, (i + 1) % size) for i in range(size)]

  def merge(acc, k, v):
    out, m, l = acc                                                   # [b,n,h,d], [b,h,n], [b,h,n]
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, k.astype(jnp.float32))
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(-1)
    out = out * correction.transpose(0, 2, 1)[..., None] + jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
    return out, m_new, l

  def body(_, carry):
    acc, k, v = carry
    acc = merge(acc, k, v)
    return acc, jax.lax.ppermute(k, axis, perm), jax.lax.ppermute(v, axis, perm)

  acc = (jnp.zeros((b, n, h, d), jnp.float32), jnp.full((b, h, n), -1e30, jnp.float32),
         jnp.zeros((b, h, n), jnp.float32))
  acc, k, v = jax.lax.fori_loop(0, size - 1, body, (acc, k, v))
  out, _, l = merge(acc, k, v)
  return (out / l.transpose(0, 2, 1)[..., None]).astype(q.dtype)

