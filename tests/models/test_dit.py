"""DiT shapes, patchify, RoPE, adaLN-zero, the text encoder and the layer scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import SMALL, TINY
from jaxvid import config
from jaxvid.data import synthetic
from jaxvid.models import dit, rope, text


def _forward(cfg, x, t, captions):
  model = dit.build(cfg)
  tokens = jnp.asarray(text.make_tokenizer(cfg)(captions))
  emb, mask = model.encode_text(tokens)
  return model, model(x, t, emb, mask)


@pytest.mark.parametrize("frames, height, width", [(2, 16, 16), (4, 16, 32), (8, 32, 16), (6, 24, 24)])
def test_output_shape_matches_input(frames, height, width):
  cfg = config.load(TINY, SMALL)
  x = jax.random.normal(jax.random.key(0), (2, frames, height, width, 3))
  _, v = _forward(cfg, x, jnp.array([0.1, 0.9]), ["a red circle", ""])
  assert v.shape == x.shape and v.dtype == jnp.float32


def test_patchify_round_trip_and_order():
  x = jax.random.normal(jax.random.key(1), (2, 4, 8, 12, 3))
  p = dit.patchify(x, (2, 4, 4))
  assert p.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
  np.testing.assert_array_equal(dit.unpatchify(p, (2, 2, 3), (2, 4, 4)), x)
  # Token 1 is the patch at (t=0, h=0, w=1): raster order over (t, h, w).
  np.testing.assert_array_equal(p[0, 1].reshape(2, 4, 4, 3), x[0, 0:2, 0:4, 4:8])


def test_adaln_zero_starts_at_zero_output():
  cfg = config.load(TINY, SMALL)
  x = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 3))
  _, v = _forward(cfg, x, jnp.array([0.3, 0.6]), ["a", "b"])
  np.testing.assert_array_equal(v, 0.0)


def test_rope_depends_only_on_relative_position():
  head_dim, theta = 24, 10000.0
  assert sum(rope.axis_dims(head_dim)) == head_dim and all(d % 2 == 0 for d in rope.axis_dims(head_dim))
  angles = rope.rope_angles((3, 4, 5), head_dim, theta)
  assert angles.shape == (60, head_dim // 2)
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, head_dim))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))
  idx = lambda t, h, w: (t * 4 + h) * 5 + w
  score = lambda a, b: float(jnp.sum(rope.apply_rope(q, angles[a:a + 1]) * rope.apply_rope(k, angles[b:b + 1])))
  # Shifting both positions by the same offset keeps the score; different offsets change it.
  assert score(idx(0, 1, 1), idx(1, 2, 3)) == pytest.approx(score(idx(1, 2, 2), idx(2, 3, 4)), rel=1e-4)
  assert score(idx(0, 1, 1), idx(1, 2, 3)) != pytest.approx(score(idx(0, 1, 1), idx(2, 2, 3)), rel=1e-3)


def _nonzero_model(cfg):
  """The model with its zero-initialized parameters made random, so every path reaches the output."""
  model = dit.build(cfg)
  for path, p in nnx.iter_graph(model):
    if isinstance(p, nnx.Param) and not np.any(p[...]):
      p[...] = 0.02 * jax.random.normal(jax.random.key(len(path)), p.shape)
  return model


def test_sincos_embedding_gives_every_patch_its_own_position():
  emb = rope.sincos_embedding((3, 4, 5), 48, 10000.0)
  assert emb.shape == (60, 48)
  assert len({tuple(np.round(np.asarray(row), 5)) for row in emb}) == 60
  # Each axis owns its slice of the width: tokens in the same frame share the time slice.
  dt, dh, _ = rope.axis_dims(48)
  np.testing.assert_array_equal(emb[0, :dt], emb[19, :dt])     # (0, 0, 0) and (0, 3, 4)
  np.testing.assert_array_equal(emb[0, dt:dt + dh], emb[20, dt:dt + dh])   # (0, 0, 0) and (1, 0, 0)


@pytest.mark.parametrize("pos_embed, varies", [("sincos", True), ("none", False)])
def test_only_absolute_positions_let_a_constant_input_give_a_position_dependent_output(pos_embed, varies):
  # With RoPE alone every token of a constant video is the same and attends to the same values,
  # so the output cannot say where anything is; this is what `model.pos_embed` is for.
  cfg = config.load(TINY, SMALL + [f"--config.model.pos_embed={pos_embed}"])
  model = _nonzero_model(cfg)
  emb, mask = model.encode_text(jnp.asarray(text.make_tokenizer(cfg)(["a red circle"])))
  v = model(jnp.zeros((1, 4, 16, 16, 3)), jnp.array([0.9]), emb, mask)
  tokens = dit.patchify(v, tuple(cfg.model.patch))[0]          # [N, patch values]
  spread = float(jnp.abs(tokens - tokens[:1]).max())
  assert (spread > 1e-4) == varies, spread


def test_text_changes_the_output_once_trained_weights_are_nonzero():
  cfg = config.load(TINY, SMALL)
  model = _nonzero_model(cfg)
  tok = jnp.asarray(text.make_tokenizer(cfg)(["a red circle moving left", "a blue square moving up"]))
  emb, mask = model.encode_text(tok)
  x = jnp.ones((1, 4, 16, 16, 3))
  v1 = model(x, jnp.array([0.5]), emb[:1], mask[:1])
  v2 = model(x, jnp.array([0.5]), emb[1:], mask[1:])
  assert float(jnp.abs(v1 - v2).max()) > 1e-4


def test_byte_tokenizer():
  tok = text.ByteTokenizer(6)
  out = tok(["ab", "", "héllo"])
  assert out.dtype == np.int32 and out.shape == (3, 6)
  assert list(out[0]) == [text.BOS, ord("a") + 2, ord("b") + 2, 0, 0, 0]
  assert list(out[1]) == [text.BOS, 0, 0, 0, 0, 0]
  assert out[2, 0] == text.BOS and np.all(out[2] > 0)   # cut to max_len
  assert tok.truncates("héllo") and not tok.truncates("abc")


def test_word_tokenizer_gives_each_word_one_stable_id():
  tok = text.WordTokenizer(6, vocab=4096)
  out = tok(["A red circle, moving LEFT", "", "red red"])
  assert out.dtype == np.int32 and out.shape == (3, 6)
  assert out[0, 0] == text.BOS and np.all(out[0, 1:] >= 2) and np.all(out < 4096)
  assert out[0, 2] == out[2, 1] == out[2, 2]        # "red" is the same id everywhere
  assert list(out[1]) == [text.BOS, 0, 0, 0, 0, 0]
  assert tok.truncates("one two three four five six") and not tok.truncates("one two")
  # The synthetic captions' words never share a bucket, so no two captions read the same.
  words = {"a", "moving", "on", "background", *synthetic.COLORS, *synthetic.SHAPES, *synthetic.DIRECTIONS,
           *synthetic.BACKGROUNDS}
  assert len({int(tok([w])[0, 1]) for w in words}) == len(words)


@pytest.mark.parametrize("encoder, vocab, lengths", [("words", 100, [4, 2]), ("bytes", 258, [13, 2])])
def test_text_encoder_embeds_its_vocabulary(encoder, vocab, lengths):
  cfg = config.load(TINY, SMALL + [f"--config.text.encoder={encoder}", "--config.text.vocab=100"])
  model = dit.build(cfg)
  assert model.text_encoder.embed.embedding.shape == (vocab, cfg.text.width)
  emb, mask = model.encode_text(jnp.asarray(text.make_tokenizer(cfg)(["a red circle", "a"])))
  assert emb.shape == (2, cfg.text.max_len, cfg.text.width)
  assert mask.sum(1).tolist() == lengths


def test_remat_and_unrolling_give_the_same_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 3))

  def grads(remat, *overrides):
    cfg = config.load(TINY, SMALL + ["--config.model.depth=2", f"--config.model.remat={remat}", *overrides])
    tok = jnp.asarray(text.make_tokenizer(cfg)(["a", "b"]))
    graphdef, params = nnx.split(dit.build(cfg), nnx.Param)
    params = jax.tree.map(lambda p: p + 0.01, params)   # off the zero init

    def loss(p):
      m = nnx.merge(graphdef, p)
      return jnp.mean(m(x, jnp.array([0.2, 0.7]), *m.encode_text(tok)) ** 2)

    return jax.jit(jax.grad(loss))(params)

  base = grads("none")
  for remat in ("full", "dots", "dots_no_batch"):
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(grads(remat))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=remat)
  # Unrolling the layer scan changes the program, not the model (its hash: tests/test_config.py).
  unrolled = grads("none", "--config.model.scan_unroll=2")
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(unrolled)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg="scan_unroll=2")


def test_blocks_are_stacked_for_the_layer_scan():
  cfg = config.load(TINY, SMALL + ["--config.model.depth=3"])
  _, params = nnx.split(nnx.eval_shape(lambda: dit.build(cfg)), nnx.Param)
  assert params["blocks"]["attn1"]["q"]["kernel"].shape == (3, 32, 32)
  spec = nnx.get_partition_spec(params)["blocks"]["attn1"]["q"]["kernel"].get_value()
  assert tuple(spec) == ("layers", "embed", "heads")
