"""Small building blocks shared by the models: dense layers with logical axes, norms, MLP,
and the mean the losses take.

Parameters are stored in `param_dtype` and used in `dtype` (the compute dtype); norms and
softmax run in float32 whatever the compute dtype.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxvid.parallel import sharding as sh

Dtype = jnp.dtype
# The name of a dense layer's product on CPU in low precision (see `dot_general`).
DENSE = "dense"


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`jax.lax.dot_general` (the matmul of `dense`), which on CPU accumulates low-precision
  inputs into a float32 result and then casts it to the inputs' dtype, in the backward too.
  XLA:CPU runs bfloat16 x bfloat16 -> float32 on its fast kernels (AMX or AVX512-BF16 where the
  CPU has them) but bfloat16 -> bfloat16 on a slow path: on a Xeon with AMX, one core, 2048^3,
  600 against 118 GFLOP/s. Same dtypes in and out as plain dot_general; other dtypes and
  platforms unchanged. A dense layer's product there is a custom VJP named DENSE (the remat
  policies of models/dit.py save it as they save dots); it has no forward-mode derivative (jvp).
  The platform is the default backend's when traced, as in models/attention.py."""
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
  if jax.default_backend() != "cpu" or out_dtype not in (jnp.bfloat16, jnp.float16):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  if (rhs.ndim == 2 and lhs.dtype == rhs.dtype and all(v is None for v in kwargs.values())   # e.g. out_sharding
      and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))):
    return checkpoint_name(_matmul(lhs, rhs, precision, out_dtype), DENSE)    # a dense layer's x @ W
  return _acc32(lhs, rhs, dimension_numbers, precision, out_dtype, **kwargs)


def _acc32(lhs, rhs, dims, precision, out_dtype, **kwargs):
  return jax.lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=jnp.float32,
                             **kwargs).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, precision, out_dtype):
  """x [..., K] @ w [K, N] -> [..., N] in out_dtype, accumulated in float32; so are the two
  products of the backward (autodiff of `_acc32` would run them on float32 x float32 inputs)."""
  return _acc32(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision, out_dtype)


def _matmul_fwd(x, w, precision, out_dtype):
  return _matmul(x, w, precision, out_dtype), (x, w)


def _matmul_bwd(precision, out_dtype, res, g):
  x, w = res
  g = g.astype(x.dtype)
  lead = tuple(range(x.ndim - 1))
  dx = _acc32(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision, x.dtype)        # g [..., N] w^T -> [..., K]
  dw = _acc32(x, g, ((lead, lead), ((), ())), precision, w.dtype)                 # x^T g -> [K, N]
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# `mean` averages groups of trailing axes of at least this many elements at a time.
MEAN_ROW = 256


def mean(x: jax.Array) -> jax.Array:
  """The mean of all of x [...] -> [] in float32, in stages: over the fewest trailing axes that
  hold MEAN_ROW elements, then again over the result's, to the end. XLA:CPU's own reduction of
  a many-axis array to one number (jaxvid turns YNNPACK's off, parallel/distributed.py)
  accumulates largely in sequence: the mean square of an [8, 9, 32, 32, 16] float32 difference
  came out 6e-4 off, this way 1e-7 (tests/models/test_layers.py). XLA merges a sum of sums
  into one reduction, not a mean of means. No reshape, so a sharded array is not resharded.
  The losses use it; on GPU and TPU it costs a second, small reduction."""
  x = x.astype(jnp.float32)
  while x.ndim > 1:
    k, n = x.ndim, 1
    while k > 0 and n < MEAN_ROW:
      k, n = k - 1, n * x.shape[k - 1]
    if k == 0:
      break
    x = jnp.mean(x, axis=tuple(range(k, x.ndim)))
  return jnp.mean(x)                                           # an empty array's: nan, as jnp.mean


def dense(din: int, dout: int, axes: tuple, *, dtype, param_dtype, rngs: nnx.Rngs,
          zero_init: bool = False, use_bias: bool = True) -> nnx.Linear:
  """nnx.Linear whose kernel [din, dout] and bias [dout] carry logical axis names."""
  init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.xavier_uniform()
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(init, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
      dot_general=dot_general, rngs=rngs)


def rms_norm(dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """RMSNorm with a learned scale [dim]; computes in float32."""
  return nnx.RMSNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (sh.EMBED,)),
                     rngs=rngs)


def layer_norm(dim: int, *, eps: float, affine: bool, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis, float32, optionally with scale and bias [dim]."""
  return nnx.LayerNorm(
      dim, epsilon=eps, use_scale=affine, use_bias=affine, dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (sh.EMBED,)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (sh.EMBED,)),
      rngs=rngs)


class MLP(nnx.Module):
  """x [..., D] -> Linear(D, F) -> GELU (tanh) -> Linear(F, D) -> [..., D]."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden, (sh.EMBED, sh.MLP), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = dense(hidden, dim, (sh.MLP, sh.EMBED), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def timestep_features(t: jax.Array, dim: int, scale: float = 1000.0) -> jax.Array:
  """Sinusoidal features of flow time: t [B] in [0, 1] -> [B, dim] float32 (cos then sin)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * scale)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
