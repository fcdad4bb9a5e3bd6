"""Positions of the (time, height, width) patch grid: 3D rotary and 3D sin-cos embeddings.

Rotary (in every self-attention): the head dim K is split as in Wan 2.1: height and width get
2 * (K // 6) each, time the rest. Each part rotates consecutive pairs (x[2i], x[2i+1]) by its
axis position times a frequency. It tells attention how far apart two tokens are.

Sin-cos (added once to the tokens, `model.pos_embed = "sincos"`): the same split of the width D,
each part [cos, sin] of position times frequencies. It tells each token where it is: with
rotary alone every token of a pure-noise input looks alike, so the first denoising steps cannot
put more mass in the center than at the edges (or, in principle, on the right in early frames).
"""

import jax
import jax.numpy as jnp


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  """(t, h, w) split of the head dim; each part is even."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def _freqs(dim: int, theta: float) -> jax.Array:
  """[dim // 2] inverse frequencies."""
  return 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def _axis_angles(grid: tuple[int, int, int], dim: int, theta: float) -> list[jax.Array]:
  """Per axis (t, h, w): position times frequency of every patch, [N, d_axis / 2] float32."""
  parts = []
  for axis, (size, d) in enumerate(zip(grid, axis_dims(dim))):
    angles = jnp.arange(size, dtype=jnp.float32)[:, None] * _freqs(d, theta)[None, :]   # [size, d/2]
    shape = [1, 1, 1, d // 2]
    shape[axis] = size
    parts.append(jnp.broadcast_to(angles.reshape(shape), (*grid, d // 2)).reshape(-1, d // 2))
  return parts


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float) -> jax.Array:
  """Rotation angles for a (T', H', W') grid of patches: [N, K // 2] float32, N = T' H' W'."""
  return jnp.concatenate(_axis_angles(grid, head_dim, theta), axis=-1)


def sincos_embedding(grid: tuple[int, int, int], dim: int, theta: float) -> jax.Array:
  """Fixed absolute embedding of a (T', H', W') grid: [N, dim] float32, N = T' H' W'."""
  return jnp.concatenate([jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)
                          for a in _axis_angles(grid, dim, theta)], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x [B, N, heads, K] by angles [N, K // 2]; computes in float32, returns x.dtype."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
