"""Attention: the kernel call (one of BACKENDS), self-attention with 3D RoPE, cross-attention to text.

Layouts: tokens x [B, N, D]; per-head q, k, v [B, N, heads, K] (what
`jax.nn.dot_product_attention` takes).

Backends (`model.attention`), all softmax(q k^T / sqrt(K)) v with an optional key mask:
  xla      jax.nn.dot_product_attention: materializes the [B, heads, Nq, Nk] scores.
  blocked  `blocked_attention` below, pure JAX: an online softmax over key blocks, a custom VJP
           that recomputes the scores block by block (FlashAttention-2), so memory is linear in
           N; on CPU one head at a time. Runs everywhere; the CPU default.
  cudnn    jax.nn.dot_product_attention(implementation="cudnn"), the fused flash kernel on
           NVIDIA GPUs; bfloat16 / float16 only.
  splash   the Pallas TPU splash-attention kernel; TPU only.
  auto     resolved per platform when traced (see `resolve`): cudnn on GPU (xla where cudnn
           cannot take the dtype or head size), splash on TPU, blocked on CPU (xla for the few
           keys of text cross-attention).

A query row whose keys are all masked gets the mean of all its values from xla and blocked
(the way jax.nn.dot_product_attention defines it); cudnn and splash leave it undefined.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
from flax import nnx

from jaxvid import config
from jaxvid.models import layers, rope
from jaxvid.parallel import context as cp
from jaxvid.parallel import sharding as sh

BACKENDS = config.ATTENTION
# blocked_attention's tiles (queries x keys), from scripts/bench_attention.py on a 2-core CPU at
# B=2, N=2048, heads=6, K=64 float32: 256 to 1024 wide tiles are within 10% of each other
# (512x256 best or tied in every sweep); 128-wide ones are 1.4x slower, one 2048 tile 1.2x.
BLOCK_Q, BLOCK_K = 512, 256
# Blocked attention runs a head at a time on CPU when one clip's tile of every head's scores is
# larger (bench_cpu's 6 x 512 x 256 float32, 3 MiB: in one process against all heads a tile,
# train step -2 to -6%, forward -4%; tiny's 4 x 256 x 256, 1 MiB: looping 1-5% slower).
TILE_BYTES = 1 << 20
# auto on CPU keeps xla up to this many keys (scripts/bench_attention.py, fwd+bwd, xla against
# blocked: 2,048 queries x 32 text keys 7.8 / 14.9 ms, x 64 15.5 / 23.2, x 128 50 / 35; 256 video
# tokens, 4 heads of 32, 14.8 / 12.7 ms).
CPU_XLA_KEYS = 64
# What a masked score becomes (the value jax.nn.dot_product_attention uses): finite, so a row
# with every key masked still has a softmax (uniform over its keys).
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def resolve(backend: str, q: jax.Array, k: jax.Array) -> str:
  """The backend that runs for `backend` on this platform ("auto" is chosen here, when traced).

  auto: GPU: cudnn, or xla where cuDNN cannot take the dtype (float32) or head dim. TPU: splash.
  CPU: blocked, or xla for at most CPU_XLA_KEYS keys (the text of cross-attention).
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; one of {BACKENDS}")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "gpu":
    return "cudnn" if _cudnn_reason(q) is None else "xla"
  if platform == "tpu":
    return "splash"
  return "blocked" if k.shape[1] > CPU_XLA_KEYS else "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           backend: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(K)) v: q [B, Nq, heads, K], k/v [B, Nk, heads, K],
  mask [B, Nk] (True = attend) or None -> [B, Nq, heads, K] in q's dtype."""
  backend = resolve(backend, q, k)
  if backend == "blocked":
    return blocked_attention(q, k, v, mask)
  if backend == "cudnn":
    return _cudnn(q, k, v, mask)
  if backend == "splash":
    return _splash(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])


# --- blocked: online softmax forward, FlashAttention-2 backward, in plain JAX -----------------

def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                      block_q: int | None = None, block_k: int | None = None,
                      head_loop: bool | None = None) -> jax.Array:
  """`attend` without the [Nq, Nk] score matrix: tiles of block_q queries x block_k keys.

  Forward: for each query block (lax.map), an online softmax over key blocks (lax.scan);
  keeps the output and per-row max and sum. Backward: over key blocks, then query blocks,
  recomputing each score tile; dq, dk, dv accumulate in float32 with D = rowsum(dO * O).
  Lengths need not divide the blocks (padded, and padded keys masked). Matmuls take the
  input dtype and accumulate in float32; the softmax is float32. Blocks default to
  BLOCK_Q x BLOCK_K. `head_loop`: one head at a time (a lax.map over heads) instead of all
  heads in each tile; None: `loops_heads`.
  """
  if k.shape[1] == 0:
    raise ValueError("blocked_attention needs at least one key")
  block_q, block_k = min(block_q or BLOCK_Q, q.shape[1]), min(block_k or BLOCK_K, k.shape[1])
  if not (loops_heads(q, block_q, block_k) if head_loop is None else head_loop) or q.shape[2] == 1:
    return _blocked(q, k, v, mask, block_q, block_k)
  one_head = lambda x: jnp.moveaxis(x, 2, 0)[..., None, :]                       # [heads, B, N, 1, K]
  out = jax.lax.map(lambda qkv: _blocked(*qkv, mask, block_q, block_k), (one_head(q), one_head(k), one_head(v)))
  return jnp.moveaxis(out[..., 0, :], 0, 2)


def loops_heads(q: jax.Array, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> bool:
  """Whether blocked attention of q [B, Nq, heads, K] in block_q x block_k tiles runs a head
  at a time: on CPU where one clip's tile of every head's scores is over TILE_BYTES, so that a
  head's tiles stay in the core's cache, unless the mesh splits the heads (a loop over a split
  axis would gather it)."""
  tile = q.shape[2] * min(block_q, q.shape[1]) * block_k * 4
  if jax.default_backend() != "cpu" or tile <= TILE_BYTES:
    return False
  ctx = sh.current()
  if ctx is None or jax.sharding.get_abstract_mesh().manual_axes:      # no mesh, or per device
    return True
  mesh, rules = ctx
  return sh.logical_to_spec((sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None), rules, mesh)[2] is None


def _tiles(x: jax.Array, size: int) -> jax.Array:
  """[B, N, heads, K] -> [N/size, B, heads, size, K], zero-padded to whole blocks."""
  b, n, h, d = x.shape
  nb = -(-n // size)
  x = jnp.pad(x, ((0, 0), (0, nb * size - n), (0, 0), (0, 0)))
  return x.reshape(b, nb, size, h, d).transpose(1, 0, 3, 2, 4)


def _untile(x: jax.Array, n: int) -> jax.Array:
  """[nb, B, heads, size, K] -> [B, n, heads, K] (inverse of `_tiles`)."""
  nb, b, h, size, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * size, h, d)[:, :n]


def _row_tiles(x: jax.Array, size: int) -> jax.Array:
  """Per-row values [B, N, heads] -> [N/size, B, heads, size]."""
  return _tiles(x[..., None], size)[..., 0]


def _key_tiles(mask: jax.Array | None, n: int, size: int):
  """(keep [Nk/size, B, size] or None, real [Nk/size, size] or None): the key mask and which
  keys are not padding, per key block; None where nothing is masked."""
  nb = -(-n // size)
  real = None if nb * size == n else jnp.asarray(np.arange(nb * size).reshape(nb, size) < n)
  if mask is not None:
    mask = jnp.pad(mask, ((0, 0), (0, nb * size - n))).reshape(mask.shape[0], nb, size).transpose(1, 0, 2)
  return mask, real


def _scores(a, b, keep, real, scale, keys_first=False):
  """Scaled, masked scores of one tile in float32: a = q [B, heads, bq, K], b = k -> [B, heads, bq, bk];
  with keys_first, a = k, b = q -> [B, heads, bk, bq]. keep [B, bk], real [bk] or None."""
  s = jnp.einsum("bhxd,bhyd->bhxy", a, b, preferred_element_type=jnp.float32) * scale
  key_axis = (slice(None), None, slice(None), None) if keys_first else (slice(None), None, None, slice(None))
  if keep is not None:
    s = jnp.where(keep[key_axis], s, _MASKED)
  if real is not None:
    s = jnp.where(real[None][key_axis], s, -jnp.inf)
  return s


def _fold_rows(x: jax.Array, op) -> jax.Array:
  """x [..., n] -> [...]: op (jnp.maximum or jnp.add) over the last axis, by folding halves
  elementwise down to 8 columns first. XLA:CPU reduces a minor axis 32 columns at a time in
  scalar code (with its YNNPACK reductions off, see parallel/distributed.py); folding
  vectorizes: the row max of a [6, 512, 256] score tile on one core, 811 -> 300 us."""
  while x.shape[-1] > 8 and x.shape[-1] % 2 == 0:
    half = x.shape[-1] // 2
    x = op(x[..., :half], x[..., half:])
  return x.max(-1) if op is jnp.maximum else x.sum(-1)


def _forward(q, k, v, mask, block_q, block_k):
  """-> out [B, Nq, heads, K], row max m and row sum l [Nq/bq, B, heads, bq] float32."""
  scale = q.shape[-1] ** -0.5
  qt, kt, vt = _tiles(q, block_q), _tiles(k, block_k), _tiles(v, block_k)
  keep, real = _key_tiles(mask, k.shape[1], block_k)

  def query_block(qi):
    def key_block(carry, xs):
      o, m, l = carry
      kj, vj, keep_j, real_j = xs
      s = _scores(qi, kj, keep_j, real_j, scale)
      m_new = jnp.maximum(m, _fold_rows(s, jnp.maximum))
      p = jnp.exp(s - m_new[..., None])
      c = jnp.exp(m - m_new)
      o = o * c[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p.astype(vj.dtype), vj,
                                        preferred_element_type=jnp.float32)
      return (o, m_new, l * c + _fold_rows(p, jnp.add)), None

    rows = qi.shape[:-1]
    init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(rows, -jnp.inf), jnp.zeros(rows, jnp.float32))
    (o, m, l), _ = jax.lax.scan(key_block, init, (kt, vt, keep, real))
    return o / l[..., None], m, l

  o, m, l = jax.lax.map(query_block, qt)
  return _untile(o, q.shape[1]).astype(q.dtype), m, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q, k, v, mask, block_q, block_k):
  return _forward(q, k, v, mask, block_q, block_k)[0]


def _blocked_fwd(q, k, v, mask, block_q, block_k):
  out, m, l = _forward(q, k, v, mask, block_q, block_k)
  return out, (q, k, v, mask, out, m, l)


def _blocked_bwd(block_q, block_k, res, d_out):
  # Tiles are [keys, queries] here: on CPU a matmul that contracts the minor (last) axis of
  # one operand and the major axis of the other is the fast one, and dv = p^T dO, dk = ds^T q
  # are then of that kind; dq comes out transposed (measured: scripts/bench_attention.py), as
  # k^T ds from the key tile transposed once per key block. The optimization barrier keeps XLA
  # from folding that transpose back into the product, which XLA:CPU then leaves to Eigen
  # instead of YNNPACK: bench_cpu train step 3.41 -> 3.37 s (alternating, 4 of 4 rounds).
  q, k, v, mask, out, m, l = res
  scale = q.shape[-1] ** -0.5
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)       # D [B, Nq, heads]
  qt, dot = _tiles(q, block_q), _tiles(d_out.astype(q.dtype), block_q)
  kt, vt = _tiles(k, block_k), _tiles(v, block_k)
  keep, real = _key_tiles(mask, k.shape[1], block_k)
  rows = (qt, dot, m, 1 / l, _row_tiles(delta, block_q), jnp.arange(qt.shape[0]))
  f32 = dict(preferred_element_type=jnp.float32)

  def key_block(dq_t, xs):
    kj, vj, keep_j, real_j = xs
    kj_t = jax.lax.optimization_barrier(jnp.swapaxes(kj, -1, -2))               # [B, heads, K, bk]

    def query_block(carry, xs):
      dq_t, dk, dv = carry
      qi, doi, mi, inv_li, di, i = xs
      s = _scores(kj, qi, keep_j, real_j, scale, keys_first=True)                  # [B, heads, bk, bq]
      p = jnp.exp(s - mi[..., None, :]) * inv_li[..., None, :]
      dv = dv + jnp.einsum("bhkq,bhqd->bhkd", p.astype(doi.dtype), doi, **f32)
      dp = jnp.einsum("bhkd,bhqd->bhkq", vj, doi, **f32)
      ds = p * (dp - di[..., None, :]) * scale
      if keep_j is not None:     # masked scores are constants (this matters for all-masked rows)
        ds = jnp.where(keep_j[:, None, :, None], ds, 0.0)
      ds = ds.astype(qi.dtype)
      dq_t = dq_t.at[i].add(jnp.einsum("bhdk,bhkq->bhdq", kj_t, ds, **f32))
      dk = dk + jnp.einsum("bhkq,bhqd->bhkd", ds, qi, **f32)
      return (dq_t, dk, dv), None

    zeros = jnp.zeros(kj.shape, jnp.float32)
    (dq_t, dk, dv), _ = jax.lax.scan(query_block, (dq_t, zeros, zeros), rows)
    return dq_t, (dk, dv)

  nq, b, h, bq, d = qt.shape
  dq_t, (dk, dv) = jax.lax.scan(key_block, jnp.zeros((nq, b, h, d, bq), jnp.float32), (kt, vt, keep, real))
  return (_untile(jnp.swapaxes(dq_t, -1, -2), q.shape[1]).astype(q.dtype),
          _untile(dk, k.shape[1]).astype(k.dtype), _untile(dv, v.shape[1]).astype(v.dtype), None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# --- platform kernels ----------------------------------------------------------------------------

def _cudnn_reason(q: jax.Array) -> str | None:
  """Why cuDNN's fused kernel cannot take q (None: it can)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"needs bfloat16 or float16 inputs, got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"needs a head dim that is a multiple of 8 and at most 128, got {q.shape[-1]}"
  return None


def _cudnn(q, k, v, mask):
  """jax.nn.dot_product_attention on cuDNN (NVIDIA GPUs). cuDNN takes a mask only as a bias
  of the full [Nq, Nk] shape, so the key mask is broadcast to it."""
  if (reason := _cudnn_reason(q)) is not None:
    raise ValueError(f"attention backend 'cudnn' {reason}; use --config.model.dtype=bfloat16 "
                     "or --config.model.attention=auto")
  if mask is not None:
    mask = jnp.broadcast_to(mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def _splash(q, k, v, mask, interpret: bool = False):
  """The Pallas splash-attention kernel (TPU). A Pallas kernel is opaque to XLA's partitioner,
  so on a mesh (`sharding.activation_rules`) it runs per device under shard_map: queries split
  as the activations are (batch, tokens, heads), keys and values whole along their tokens.
  `interpret` runs the kernel's interpreter instead, for tests off TPU."""
  ctx = sh.current()
  if ctx is None or jax.sharding.get_abstract_mesh().manual_axes:     # no mesh, or inside shard_map
    return _splash_local(q, k, v, mask, interpret)
  mesh, rules = ctx
  q_spec = sh.logical_to_spec((sh.BATCH, sh.LENGTH, sh.ACT_HEADS, None), rules, mesh)
  kv_spec = P(q_spec[0], None, q_spec[2], None)
  args, specs = (q, k, v), (q_spec, kv_spec, kv_spec)
  if mask is not None:
    args, specs = args + (mask,), specs + (P(q_spec[0], None),)
  local = lambda q, k, v, mask=None: _splash_local(q, k, v, mask, interpret)
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _splash_local(q, k, v, mask, interpret):
  """splash on whole arrays, per batch element. Lengths are padded to multiples of 128 (the
  kernel's lane width); padded keys and the key mask become segment ids (a query of segment 1
  sees keys of segment 1)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  (b, nq, heads, dim), nk = q.shape, k.shape[1]
  pq, pk = -(-nq // 128) * 128, -(-nk // 128) * 128
  bq, bk = (next(s for s in (512, 256, 128) if n % s == 0) for n in (pq, pk))
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                            block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((pq, pk))] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  ids = None
  if mask is not None or pk != nk:
    keep = jnp.ones((b, nk), bool) if mask is None else mask
    ids = splash.SegmentIds(q=jnp.ones((b, pq), jnp.int32),
                            kv=jnp.pad(keep, ((0, 0), (0, pk - nk))).astype(jnp.int32))
  heads_first = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q = (q * dim ** -0.5).astype(k.dtype)                  # the kernel does not scale
  out = jax.vmap(kernel)(heads_first(q, pq), heads_first(k, pk), heads_first(v, pk), ids)
  return out.transpose(0, 2, 1, 3)[:, :nq]


# --- the module ------------------------------------------------------------------------------------
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
