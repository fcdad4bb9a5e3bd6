"""Small building blocks shared by the models: dense layers with logical axes, norms, MLP.

Parameters are stored in `param_dtype` and used in `dtype` (the compute dtype); norms and
softmax run in float32 whatever the compute dtype.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvid.parallel import sharding as sh

Dtype = jnp.dtype


def dense(din: int, dout: int, axes: tuple, *, dtype, param_dtype, rngs: nnx.Rngs,
          zero_init: bool = False, use_bias: bool = True) -> nnx.Linear:
  """nnx.Linear whose kernel [din, dout] and bias [dout] carry logical axis names."""
  init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.xavier_uniform()
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(init, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
      rngs=rngs)


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
