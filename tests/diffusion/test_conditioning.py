"""Known-part masks for training, the masked loss, and the model's mask input."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid import config as config_lib
from jaxvid.diffusion import conditioning
from jaxvid.diffusion import flow as flow_lib
from jaxvid.models import dit

SHAPE = (256, 8, 6, 10)    # B, T, H, W


def _only(kind):
  return conditioning.MaskDistribution(tuple(float(k == kind) for k in conditioning.KINDS))


def _sample(kind, seed=0):
  mask = np.asarray(_only(kind).sample(jax.random.key(seed), SHAPE))
  assert mask.shape == SHAPE + (1,) and mask.dtype == np.float32
  return mask[..., 0].astype(bool)


def test_each_kind_of_mask():
  assert not _sample("none").any()
  first = _sample("first_frame")
  assert first[:, 0].all() and not first[:, 1:].any()
  for kind in ("prefix", "suffix"):
    m = _sample(kind)
    frames = m.all(axis=(2, 3))                              # [B, T]: whole frames only
    assert (m.any(axis=(2, 3)) == frames).all()
    k = frames.sum(1)
    assert k.min() == 1 and k.max() == SHAPE[1] - 1          # 1 <= k < T, both ends reached
    ordered = frames if kind == "prefix" else frames[:, ::-1]
    assert (ordered == (np.arange(SHAPE[1])[None] < k[:, None])).all()
  boxes = ~_sample("boxes")                                 # the part to generate: one box
  for b in boxes:
    t, y, x = np.nonzero(b)
    assert len(t) > 0
    box = np.zeros_like(b)
    box[t.min():t.max() + 1, y.min():y.max() + 1, x.min():x.max() + 1] = True
    assert (box == b).all()                                  # a solid box over a range of frames
    assert 1 <= y.max() + 1 - y.min() <= 3 * SHAPE[2] // 4
  spans = (~_sample("boxes")).any(axis=(2, 3)).all(axis=1)
  assert 0.3 < spans.mean() < 0.8                             # about half the boxes span every frame


def test_kinds_follow_their_weights():
  dist = conditioning.MaskDistribution((0.5, 0.0, 0.5, 0.0, 0.0))
  m = np.asarray(dist.sample(jax.random.key(1), (2000, 4, 2, 2)))[..., 0]
  none = ~m.any(axis=(1, 2, 3))
  assert 0.45 < none.mean() < 0.55
  assert m[~none][:, 0].all()                                # the rest are prefixes


def test_masks_depend_on_the_key_only():
  a = _only("boxes").sample(jax.random.key(3), SHAPE)
  np.testing.assert_array_equal(a, _only("boxes").sample(jax.random.key(3), SHAPE))
  assert np.any(a != _only("boxes").sample(jax.random.key(4), SHAPE))


def test_masked_loss_counts_only_unknown_elements_and_shows_them_clean():
  x0 = jax.random.normal(jax.random.key(0), (4, 3, 2, 2, 3))
  known = _only("prefix").sample(jax.random.key(1), (4, 3, 2, 2))
  rng = jax.random.key(2)
  _, rng_noise = jax.random.split(rng)
  noise = jax.random.normal(rng_noise, x0.shape)
  seen = []

  def velocity(x, t):        # exact where unknown, garbage where known
    seen.append(x)
    return jnp.where(known > 0, 1e3, noise - x0)

  assert float(flow_lib.loss(velocity, x0, rng, flow_lib.Flow(), known)) == pytest.approx(0.0, abs=1e-10)
  np.testing.assert_array_equal(jnp.where(known > 0, seen[0], 0), jnp.where(known > 0, x0, 0))
  assert float(flow_lib.loss(velocity, x0, rng, flow_lib.Flow())) > 1e5   # unmasked: the garbage counts


def test_apply_keeps_known_elements():
  x, known_x = jnp.zeros((1, 2, 1, 1, 3)), jnp.ones((1, 2, 1, 1, 3))
  mask = jnp.array([1.0, 0.0]).reshape(1, 2, 1, 1, 1)
  np.testing.assert_array_equal(conditioning.apply(x, known_x, mask)[0, :, 0, 0, 0], [1.0, 0.0])


def test_dit_takes_the_mask_as_an_input_channel(small_config):
  cfg = small_config
  assert cfg.model.condition == "mask"
  with cfg.unlocked():
    plain = config_lib.ConfigDict(cfg.to_dict())
  plain.model.condition = "none"
  count = lambda c: sum(x.size for x in jax.tree.leaves(dit.build(c)))
  pt, ph, pw = cfg.model.patch
  assert count(cfg) - count(plain) == pt * ph * pw * cfg.model.width    # one more input channel
  model = dit.build(cfg)
  for layer in (model.proj_out, model.time_projection):   # zero at init (adaLN-zero): make them not
    layer.kernel[...] = jax.random.normal(jax.random.key(1), layer.kernel.shape)
  x = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 3))
  emb, mask = model.encode_text(jnp.ones((2, 8), jnp.int32))
  run = nnx.jit(lambda model, t, known=None: model(x, t, emb, mask, known))   # one compile per signature
  t = jnp.array([0.5, 0.5])
  known = jnp.zeros((2, 4, 16, 16, 1)).at[:, 0].set(1.0)
  v0, v1 = run(model, t), run(model, t, known)
  assert v0.shape == x.shape and float(jnp.abs(v1 - v0).max()) > 1e-3
  # Tokens given whole are modulated as at t = 0: with every token known, t does not matter.
  everything = jnp.ones_like(known)
  np.testing.assert_allclose(run(model, t, everything), run(model, jnp.zeros(2), everything), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(run(model, t) - run(model, jnp.zeros(2))).max()) > 1e-3
  np.testing.assert_allclose(v0, run(model, t, jnp.zeros_like(known)), rtol=1e-6, atol=1e-6)   # None = nothing known
