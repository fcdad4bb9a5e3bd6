"""3D rotary position embedding over (time, height, width) patch positions.

The head dim K is split as in Wan 2.1: height and width get 2 * (K // 6) each, time the rest.
Each part rotates consecutive pairs (x[2i], x[2i+1]) by its axis position times a frequency.
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


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float) -> jax.Array:
  """Rotation angles for a (T', H', W') grid of patches: [N, K // 2] float32, N = T' H' W'."""
  parts = []
  for axis, (size, dim) in enumerate(zip(grid, axis_dims(head_dim))):
    pos = jnp.arange(size, dtype=jnp.float32)
    angles = pos[:, None] * _freqs(dim, theta)[None, :]           # [size, dim/2]
    shape = [1, 1, 1, dim // 2]
    shape[axis] = size
    parts.append(jnp.broadcast_to(angles.reshape(shape), (*grid, dim // 2)))
  return jnp.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates x [B, N, heads, K] by angles [N, K // 2]; computes in float32, returns x.dtype."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
