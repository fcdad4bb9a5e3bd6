"""layers.dense's matmul: float32 accumulation of bfloat16 inputs on CPU, same dtypes out; and
layers.mean, the losses' mean, at float32 rounding on XLA:CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.models import layers


def _dense(dtype):
  return layers.dense(64, 32, ("embed", "mlp"), dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _dot_types(fn, *args) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of each dot_general in fn's lowered StableHLO."""
  text = jax.jit(fn).lower(*args).as_text()
  t = r"tensor<[\dx]*x(\w+)>"
  return re.findall(rf"stablehlo\.dot_general.*\({t}, {t}\) -> {t}", text)


def test_bfloat16_dense_accumulates_in_float32_and_returns_bfloat16():
  layer = _dense(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 10, 64))
  y = layer(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (4, 10, 32)
  assert _dot_types(lambda x: layer(x), x) == [("bf16", "bf16", "f32")]
  # Against the float32 product of the bfloat16-rounded operands: one bfloat16 rounding apart.
  xb = x.astype(jnp.bfloat16).astype(jnp.float32)
  kb = layer.kernel[...].astype(jnp.bfloat16).astype(jnp.float32)
  want = xb @ kb + layer.bias[...]
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2, atol=1e-2)


def test_bfloat16_dense_backward_accumulates_in_float32():
  layer = _dense(jnp.bfloat16)
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (4, 10, 64))
  w = jax.random.normal(jax.random.key(2), (4, 10, 32))

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * w)

  grad = jax.grad(loss, argnums=(0, 1))
  assert _dot_types(grad, params, x) == [("bf16", "bf16", "f32")] * 2    # both products of the backward
  dparams, dx = grad(params, x)
  assert dx.dtype == jnp.float32 and dparams["kernel"][...].dtype == jnp.float32
  # Against float32 autodiff of the bfloat16-rounded operands.
  round_ = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  kernel, bias = round_(layer.kernel[...]), layer.bias[...]
  want_dx, want_dk = jax.grad(lambda x, k: jnp.sum((x @ k + bias) * round_(w)), argnums=(0, 1))(round_(x), kernel)
  np.testing.assert_allclose(dx, want_dx, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(dparams["kernel"][...], want_dk, rtol=2e-2, atol=5e-2)


def test_float32_dense_is_a_plain_float32_matmul():
  layer = _dense(jnp.float32)
  x = jax.random.normal(jax.random.key(1), (4, 10, 64))
  assert _dot_types(lambda x: layer(x), x) == [("f32", "f32", "f32")]
  text = jax.jit(lambda x: layer(x)).lower(x).as_text()
  assert "convert" not in text
  np.testing.assert_allclose(layer(x), x @ layer.kernel[...] + layer.bias[...], rtol=1e-5, atol=1e-5)


def test_other_platforms_and_dtypes_keep_plain_matmuls(monkeypatch):
  x = jnp.ones((4, 64), jnp.bfloat16)
  w = jnp.ones((64, 32), jnp.bfloat16)
  dims = (((1,), (0,)), ((), ()))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _dot_types(lambda x, w: layers.dot_general(x, w, dims), x, w) == [("bf16", "bf16", "bf16")]
  monkeypatch.undo()
  big = jnp.full((1, 1), 2**30 + 1, jnp.int32)                   # not rounded through float32
  assert int(layers.dot_general(big, jnp.ones((1, 1), jnp.int32), dims)[0, 0]) == 2**30 + 1


def test_dots_remat_policy_saves_the_bfloat16_dense_product(capsys):
  from jaxvid.models import dit
  layer = _dense(jnp.bfloat16)
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (4, 10, 64))

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x)
    return jnp.sum(jnp.tanh(y.astype(jnp.float32)))

  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=dit.REMAT["dots"]), params, x)
  saved = capsys.readouterr().out
  assert re.search(r"bf16\[4,10,32\].*'dense'", saved), saved


def test_mean_of_a_many_axis_array_is_accurate():
  # conftest sets the XLA:CPU flags jaxvid's commands run with (XLA's own reductions).
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((8, 9, 32, 32, 16), dtype=np.float32) for _ in range(2))
  exact = np.mean(np.square(a.astype(np.float64) - b))
  ours = float(jax.jit(lambda a, b: layers.mean(jnp.square(a - b)))(a, b))
  assert abs(ours / exact - 1) < 1e-6          # jnp.mean: 6e-4 off with jax 0.10.2's XLA:CPU
  # Any shape, any dtype: the mean of all elements, in float32; an empty array's is nan.
  assert np.isnan(float(layers.mean(jnp.zeros((2, 0, 3)))))
  for shape in [(), (5,), (3, 7), (2, 300), (7, 3, 5), (2, 1, 513)]:
    x = rng.standard_normal(shape).astype(np.float16)
    got = layers.mean(jnp.asarray(x))
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), np.mean(x.astype(np.float64)), rtol=1e-5, atol=1e-6)
