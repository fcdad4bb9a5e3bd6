"""Attention: the kernel call, self-attention with 3D RoPE, cross-attention to text.

Layouts: tokens x [B, N, D]; per-head q, k, v [B, N, heads, K] (what
`jax.nn.dot_product_attention` takes).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvid.models import layers, rope
from jaxvid.parallel import context as cp
from jaxvid.parallel import sharding as sh

BACKENDS = ("xla",)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           backend: str = "xla") -> jax.Array:
  """softmax(q k^T / sqrt(K)) v: q [B, Nq, heads, K], k/v [B, Nk, heads, K],
  mask [B, Nk] (True = attend) or None -> [B, Nq, heads, K]."""
  if backend != "xla":
    raise ValueError(f"unknown attention backend {backend!r}; one of {BACKENDS}")
  if mask is not None:
    mask = mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


class Attention(nnx.Module):
  """Multi-head attention with RMS QK-norm across heads (Wan 2.1 layout).

  Self-attention when `context` is None (then `angles` [N, K/2] rotates q and k),
  cross-attention to `context` [B, L, D] otherwise. `kv_mask` [B, L] marks valid keys.
  `context_parallel` ("ulysses" or "ring", video self-attention only) is how attention runs
  when the tokens are split over the mesh's sequence axis (see parallel/context.py).
  """

  def __init__(self, dim: int, heads: int, *, qk_norm: bool, eps: float, backend: str,
               dtype, param_dtype, rngs: nnx.Rngs, context_parallel: str | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.backend, self.context_parallel = heads, backend, context_parallel
    self.q = layers.dense(dim, dim, (sh.EMBED, sh.HEADS), **kw)
    self.k = layers.dense(dim, dim, (sh.EMBED, sh.HEADS), **kw)
    self.v = layers.dense(dim, dim, (sh.EMBED, sh.HEADS), **kw)
    self.o = layers.dense(dim, dim, (sh.HEADS, sh.EMBED), **kw)
    norm = lambda: layers.rms_norm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.norm_q = norm() if qk_norm else None
    self.norm_k = norm() if qk_norm else None

  def __call__(self, x: jax.Array, *, angles: jax.Array | None = None,
               context: jax.Array | None = None, kv_mask: jax.Array | None = None) -> jax.Array:
    """x [B, N, D] -> [B, N, D]."""
    src = x if context is None else context
    q, k, v = self.q(x), self.k(src), self.v(src)
    if self.norm_q is not None:
      q = self.norm_q(q).astype(v.dtype)
      k = self.norm_k(k).astype(v.dtype)
    split = lambda a: a.reshape(*a.shape[:2], self.heads, -1)        # [B, N, heads, K]
    q, k, v = split(q), split(k), split(v)
    q = sh.constrain(q, (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None))
    if angles is not None:
      q, k = rope.apply_rope(q, angles), rope.apply_rope(k, angles)
    if self.context_parallel and context is None and kv_mask is None:
      out = cp.self_attention(q, k, v, self.context_parallel,
                                   lambda q, k, v: attend(q, k, v, None, self.backend))
    else:
      out = attend(q, k, v, kv_mask, self.backend)
    return self.o(out.reshape(*out.shape[:2], -1))
