"""Conditioning on known parts of the (latent) video: one model for every editing mode.

With `model.condition = "mask"`, each training example gets a mask [B, T, H, W, 1] of known
elements (1: given clean, 0: to generate), drawn from a mix of kinds (`cond.*` weights):

  none         nothing known: text-to-video
  first_frame  frame 0: image-to-video
  prefix       the first k frames, 1 <= k < T: extending a clip, long videos chunk by chunk
  suffix       the last k frames
  boxes        all but one box over a range of frames: in-painting

The known elements replace x_t in the model's input (`apply`), the mask is an extra input
channel of the model, and the loss counts only the unknown elements (flow.loss). Sampling
does the same before every model evaluation and pastes the known elements into the result, so
they come out exactly as given (up to the autoencoder's round trip).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

KINDS = ("none", "first_frame", "prefix", "suffix", "boxes")


def apply(x: jax.Array, known_x: jax.Array, known_mask: jax.Array) -> jax.Array:
  """x [B, T, H, W, C] with the known elements (known_mask [B, T, H, W, 1] = 1) taken from known_x."""
  return known_mask * known_x + (1 - known_mask) * x


@dataclasses.dataclass(frozen=True)
class MaskDistribution:
  """The training distribution of known-element masks: a weight per kind in KINDS."""
  weights: tuple[float, ...]

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "MaskDistribution":
    return cls(tuple(float(cfg.cond[k]) for k in KINDS))

  def sample(self, rng: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """Masks float32 [B, T, H, W, 1] for clips of shape (B, T, H, W), one kind per example."""
    b, t, h, w = shape
    k_kind, k_len, k_y, k_x, k_t, k_all = jax.random.split(rng, 6)
    kind = jax.random.categorical(k_kind, jnp.log(jnp.asarray(self.weights)), shape=(b,))
    ti = jnp.arange(t)[None, :, None, None]
    yi = jnp.arange(h)[None, None, :, None]
    xi = jnp.arange(w)[None, None, None, :]
    per_item = lambda a: a[:, None, None, None]

    k = per_item(jax.random.randint(k_len, (b,), 1, max(t, 2)))     # known frames, 1 <= k < T
    y0, y1 = _span(k_y, b, h)
    x0, x1 = _span(k_x, b, w)
    f0 = jax.random.randint(k_t, (b,), 0, t)
    f1 = f0 + 1 + jax.random.randint(jax.random.fold_in(k_t, 1), (b,), 0, t - f0)
    every_frame = jax.random.bernoulli(k_all, 0.5, (b,))             # half the boxes span the clip
    f0, f1 = jnp.where(every_frame, 0, f0), jnp.where(every_frame, t, f1)
    box = ((yi >= per_item(y0)) & (yi < per_item(y1)) & (xi >= per_item(x0)) & (xi < per_item(x1))
           & (ti >= per_item(f0)) & (ti < per_item(f1)))
    full = (b, t, h, w)
    masks = jnp.stack([jnp.zeros(full, bool), jnp.broadcast_to(ti == 0, full), jnp.broadcast_to(ti < k, full),
                       jnp.broadcast_to(ti >= t - k, full), ~box])              # [kinds, B, T, H, W]
    mask = jnp.take_along_axis(masks, kind[None, :, None, None, None], axis=0)[0]
    return mask[..., None].astype(jnp.float32)


def _span(rng: jax.Array, b: int, size: int) -> tuple[jax.Array, jax.Array]:
  """Random [start, end) [B] each, covering a quarter to three quarters of `size`."""
  k_len, k_pos = jax.random.split(rng)
  length = jax.random.randint(k_len, (b,), max(1, size // 4), max(1, 3 * size // 4) + 1)
  start = jnp.floor(jax.random.uniform(k_pos, (b,)) * (size - length + 1)).astype(jnp.int32)
  return start, start + length
