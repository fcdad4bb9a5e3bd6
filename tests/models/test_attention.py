"""Attention backends agree with a plain softmax reference, forward and gradients: xla, blocked
and auto here, the splash glue in the Pallas interpreter here, the cudnn and splash kernels
on a GPU / TPU only (skipped elsewhere). The DiT gives the same outputs and gradients with
model.attention=blocked as with xla."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SMALL, TINY
from jaxvid import config
from jaxvid.errors import UserError
from jaxvid.models import attention, dit, text
from jaxvid.parallel import context, sharding
from jaxvid.parallel.mesh import make_mesh

# Lengths that no block size below divides: 37 queries in blocks of 16, 23 keys in blocks of 8.
B, NQ, NK, HEADS, K = 2, 37, 23, 3, 16
BACKENDS = {
    "xla": lambda q, k, v, m: attention.attend(q, k, v, m, "xla"),
    "blocked": lambda q, k, v, m: attention.blocked_attention(q, k, v, m, block_q=16, block_k=8),
    "blocked-one-tile": lambda q, k, v, m: attention.attend(q, k, v, m, "blocked"),
    "auto": lambda q, k, v, m: attention.attend(q, k, v, m, "auto"),
}
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
on_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="splash attention needs a TPU")


def reference(q, k, v, mask):
  """softmax(q k^T / sqrt(K)) v in float32, written out; masked scores are xla's large negative."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
  if mask is not None:
    s = jnp.where(mask[:, None, None, :], s, -0.7 * np.finfo(np.float32).max)
  p = jnp.exp(s - s.max(-1, keepdims=True))
  return jnp.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v, precision="highest")


def inputs(dtype, masked, nq=NQ, nk=NK, dim=K, all_masked_row=False):
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (B, nq, HEADS, dim), dtype)
  k = jax.random.normal(keys[1], (B, nk, HEADS, dim), dtype)
  v = jax.random.normal(keys[2], (B, nk, HEADS, dim), dtype)
  w = jax.random.normal(keys[3], (B, nq, HEADS, dim), jnp.float32)     # the cotangent
  mask = None
  if masked:
    mask = (jax.random.uniform(keys[4], (B, nk)) < 0.6).at[:, 0].set(True)
    if all_masked_row:
      mask = mask.at[1].set(False)
  return q, k, v, mask, w


def value_and_grads(fn, q, k, v, mask, w):
  """fn(q, k, v, mask) and the gradients of sum(fn(...) * w) w.r.t. q, k, v (jitted: one compile)."""
  @jax.jit
  def run(q, k, v, mask, w):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return out, vjp(w.astype(out.dtype))
  return run(q, k, v, mask, w)


def assert_close(got, want, rtol):
  """Elementwise within rtol of want's largest magnitude."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, dtype, rtol, masked):
  q, k, v, mask, w = inputs(dtype, masked)
  out, grads = value_and_grads(BACKENDS[backend], q, k, v, mask, w)
  want, want_grads = value_and_grads(reference, q, k, v, mask, w)
  assert out.dtype == dtype and out.shape == q.shape
  assert_close(out, want, rtol)
  for name, g, r in zip("qkv", grads, want_grads):
    assert g.dtype == dtype, name
    assert_close(g, r, rtol)


@pytest.mark.parametrize("backend", ["blocked", "blocked-one-tile"])
def test_a_row_with_every_key_masked_is_what_xla_gives(backend):
  # jax.nn.dot_product_attention gives such a row the mean of all values (a uniform softmax
  # over finite large negatives); its gradient reaches v only.
  q, k, v, mask, w = inputs(jnp.float32, True, all_masked_row=True)
  out, grads = value_and_grads(BACKENDS[backend], q, k, v, mask, w)
  want, want_grads = value_and_grads(BACKENDS["xla"], q, k, v, mask, w)
  assert_close(out, want, 1e-5)
  np.testing.assert_allclose(out[1], np.broadcast_to(v[1].mean(0), out[1].shape), atol=1e-5)
  for g, r in zip(grads, want_grads):
    assert_close(g, r, 1e-5)
  assert not np.any(grads[1][1]) and not np.any(grads[0][1])


def test_blocked_tiles_are_exact_for_any_block_size():
  q, k, v, mask, w = inputs(jnp.float32, True)
  want, want_grads = value_and_grads(reference, q, k, v, mask, w)
  for (bq, bk), head_loop in itertools.product([(1, 1), (5, 23), (37, 3), (64, 64)], [False, True]):
    fn = lambda q, k, v, m: attention.blocked_attention(q, k, v, m, block_q=bq, block_k=bk, head_loop=head_loop)
    out, grads = value_and_grads(fn, q, k, v, mask, w)
    assert_close(out, want, 1e-5)
    for g, r in zip(grads, want_grads):
      assert_close(g, r, 1e-5)


def test_blocked_loops_over_heads_on_cpu_unless_the_mesh_splits_them(monkeypatch):
  q = jnp.zeros((2, 1024, 6, 8))                                     # 6 x 512 x 256 float32 tiles: 3 MiB
  assert attention.loops_heads(q)                                    # no mesh
  assert not attention.loops_heads(q[:, :, :2])                      # 1 MiB
  assert not attention.loops_heads(q, 128, 256)
  for mesh_shape, want in [((2, 1, 4, 1), False), ((8, 1, 1, 1), True), ((2, 2, 2, 1), False)]:
    cfg = config.base_config()
    cfg.mesh.update(dict(zip(config.MESH_AXES, mesh_shape)))
    with sharding.activation_rules(make_mesh(cfg), sharding.rules_from_config(cfg)):
      assert attention.loops_heads(q) == want, mesh_shape
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not attention.loops_heads(q)


@pytest.mark.parametrize("n", [256, 24, 7, 8, 1])
def test_folded_row_reductions_equal_max_and_sum(n):
  x = jax.random.normal(jax.random.key(n), (2, 3, 5, n)) * 10
  np.testing.assert_array_equal(attention._fold_rows(x, jnp.maximum), x.max(-1))
  np.testing.assert_allclose(attention._fold_rows(x, jnp.add), x.sum(-1), rtol=1e-5, atol=1e-4)


def test_auto_picks_per_platform(monkeypatch):
  f32, bf16 = jnp.zeros((1, 8, 1, 64)), jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
  long_keys = jnp.zeros((1, attention.CPU_XLA_KEYS + 1, 1, 64))
  for platform, q, k, want in [("cpu", f32, long_keys, "blocked"), ("cpu", f32, f32, "xla"),
                               ("gpu", bf16, bf16, "cudnn"), ("gpu", f32, f32, "xla"),
                               ("gpu", jnp.zeros((1, 8, 1, 12), jnp.bfloat16), bf16, "xla"),
                               ("tpu", f32, f32, "splash")]:
    monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
    assert attention.resolve("auto", q, k) == want, (platform, q.dtype, k.shape)
    assert attention.resolve("xla", q, k) == "xla"
  with pytest.raises(ValueError, match="unknown attention backend"):
    attention.resolve("flash", f32, f32)


def test_config_names_the_attention_backends():
  assert attention.BACKENDS == config.ATTENTION and config.base_config().model.attention == "auto"
  for bad, match in [("flash", "model.attention='flash' must be one of"),
                     ("cudnn", "model.attention='cudnn' needs --config.model.dtype=bfloat16")]:
    cfg = config.load(TINY, SMALL + [f"--config.model.attention={bad}"])
    with pytest.raises(UserError, match=match):
      config.validate(cfg, num_devices=jax.device_count())
  config.validate(config.load(TINY, SMALL + ["--config.model.attention=cudnn", "--config.model.dtype=bfloat16"]),
                  num_devices=jax.device_count())


@pytest.mark.parametrize("mesh_shape, scheme", [(None, None), ((2, 1, 4, 1), None), ((2, 1, 2, 2), None),
                                                 ((2, 1, 2, 2), "ulysses")])
def test_splash_glue_in_the_pallas_interpreter(mesh_shape, scheme):
  # The kernel itself needs a TPU; its interpreter runs here, which checks the padding to 128,
  # the key mask as segment ids, the scale, the layout, and shard_map on a mesh: batch and
  # heads split (2, 1, 4, 1); queries split over the sequence axis too (2, 1, 2, 2), as in
  # cross-attention; and inside Ulysses' shard_map. 8 simulated devices.
  masked = scheme is None
  q, k, v, mask, w = inputs(jnp.float32, masked, nq=20, nk=20 if scheme else 12, dim=64)
  q, k, v, w = (x.repeat(2, axis=2)[:, :, :4] for x in (q, k, v, w))       # 4 heads
  splash = lambda q, k, v, m: attention._splash(q, k, v, m, interpret=True)
  fn = splash
  if mesh_shape is not None:
    cfg = config.base_config()
    cfg.mesh.update(dict(zip(config.MESH_AXES, mesh_shape)))
    mesh, rules = make_mesh(cfg), sharding.rules_from_config(cfg)
    split = lambda x: sharding.constrain(x, (sharding.BATCH, sharding.LENGTH, sharding.ACT_HEADS, None))

    def fn(q, k, v, m):
      with sharding.activation_rules(mesh, rules):
        if scheme:
          return context.self_attention(split(q), split(k), split(v), scheme, lambda q, k, v: splash(q, k, v, None))
        return splash(split(q), k, v, m)

  out, grads = value_and_grads(fn, q, k, v, mask, w)
  want, want_grads = value_and_grads(reference, q, k, v, mask, w)
  assert_close(out, want, 1e-5)
  for g, r in zip(grads, want_grads):
    assert_close(g, r, 1e-5)


@on_tpu
@pytest.mark.parametrize("masked", [False, True])
def test_splash_on_tpu(masked):
  q, k, v, mask, w = inputs(jnp.bfloat16, masked, nq=200, nk=70, dim=64)
  out, grads = value_and_grads(lambda q, k, v, m: attention.attend(q, k, v, m, "splash"), q, k, v, mask, w)
  want, want_grads = value_and_grads(reference, q, k, v, mask, w)
  assert_close(out, want, 3e-2)
  for g, r in zip(grads, want_grads):
    assert_close(g, r, 3e-2)


@on_gpu
@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_on_gpu(masked):
  q, k, v, mask, w = inputs(jnp.bfloat16, masked, nq=200, nk=70, dim=64)
  out, grads = value_and_grads(lambda q, k, v, m: attention.attend(q, k, v, m, "cudnn"), q, k, v, mask, w)
  want, want_grads = value_and_grads(reference, q, k, v, mask, w)
  assert_close(out, want, 3e-2)
  for g, r in zip(grads, want_grads):
    assert_close(g, r, 3e-2)
  assert attention.resolve("auto", q, k) == "cudnn"


@on_gpu
def test_cudnn_refuses_float32():
  q = jnp.zeros((1, 8, 1, 64))
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    attention.attend(q, q, q, None, "cudnn")


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4, 1), (2, 1, 2, 2)])
def test_blocked_on_a_mesh(mesh_shape):
  # Batch over data, heads over tensor (XLA partitions the tile loops); with sequence=2 the
  # tokens are split and Ulysses runs blocked inside shard_map. 8 simulated devices.
  cfg = config.base_config()
  cfg.mesh.update(dict(zip(config.MESH_AXES, mesh_shape)))
  mesh, rules = make_mesh(cfg), sharding.rules_from_config(cfg)
  q, k, v, _, w = inputs(jnp.float32, False, nq=40, nk=40)
  q, k, v, w = (x.repeat(2, axis=2)[:, :, :4] for x in (q, k, v, w))       # 4 heads
  blocked = lambda q, k, v: attention.blocked_attention(q, k, v, block_q=16, block_k=8)

  def loss(q, k, v):
    with sharding.activation_rules(mesh, rules):
      out = context.self_attention(q, k, v, "ulysses", blocked)
    return jnp.sum(out * w), out

  spec = sharding.logical_to_spec((sharding.BATCH, sharding.LENGTH, sharding.ACT_HEADS, None), rules, mesh)
  split = jax.sharding.NamedSharding(mesh, spec)
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), in_shardings=(split,) * 3)(q, k, v)
  want, want_grads = value_and_grads(reference, q, k, v, None, w)
  assert_close(out, want, 1e-5)
  for g, r in zip(grads, want_grads):
    assert_close(g, r, 1e-5)


def test_dit_forward_and_gradients_equal_with_blocked_and_xla(monkeypatch):
  # Tiles of 8 so that the 32 video tokens and the 48 text tokens span several blocks.
  monkeypatch.setattr(attention, "BLOCK_Q", 8)
  monkeypatch.setattr(attention, "BLOCK_K", 8)
  x = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 3))
  t = jnp.array([0.2, 0.7])

  def run(backend):
    cfg = config.load(TINY, SMALL + [f"--config.model.attention={backend}"])
    tok = jnp.asarray(text.make_tokenizer(cfg)(["a red circle moving left", "b"]))
    graphdef, params = nnx.split(dit.build(cfg), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.01, params)   # off the zero init

    def loss(p):
      m = nnx.merge(graphdef, p)
      out = m(x, t, *m.encode_text(tok))
      return jnp.mean(out ** 2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss_b, out_b), grads_b = run("blocked")
  (loss_x, out_x), grads_x = run("xla")
  assert_close(out_b, out_x, 1e-5)
  np.testing.assert_allclose(loss_b, loss_x, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
