"""layers.dense's matmul: float32 accumulation of bfloat16 inputs on CPU, same dtypes out."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.models import layers


def _dense(dtype):
  return layers.dense(64, 32, ("embed", "mlp"), dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _dot_result_types(fn, *args) -> list[str]:
  """Element types of the dot_general results in fn's lowered StableHLO."""
  text = jax.jit(fn).lower(*args).as_text()
  return re.findall(r"stablehlo\.dot_general.*-> tensor<[\dx]*x(\w+)>", text)


def test_bfloat16_dense_accumulates_in_float32_and_returns_bfloat16():
  layer = _dense(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 10, 64))
  y = layer(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (4, 10, 32)
  assert _dot_result_types(lambda x: layer(x), x) == ["f32"]
  # Against the float32 product of the bfloat16-rounded operands: one bfloat16 rounding apart.
  xb = x.astype(jnp.bfloat16).astype(jnp.float32)
  kb = layer.kernel[...].astype(jnp.bfloat16).astype(jnp.float32)
  want = xb @ kb + layer.bias[...]
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2, atol=1e-2)
  # Gradients flow back in the parameters' and inputs' dtypes.
  grads = jax.grad(lambda x: layer(x).astype(jnp.float32).sum())(x)
  assert grads.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grads)))


def test_float32_dense_is_a_plain_float32_matmul():
  layer = _dense(jnp.float32)
  x = jax.random.normal(jax.random.key(1), (4, 10, 64))
  assert _dot_result_types(lambda x: layer(x), x) == ["f32"]
  text = jax.jit(lambda x: layer(x)).lower(x).as_text()
  assert "convert" not in text
  np.testing.assert_allclose(layer(x), x @ layer.kernel[...] + layer.bias[...], rtol=1e-5, atol=1e-5)
