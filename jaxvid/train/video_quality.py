"""How close a reconstructed video is to the original: PSNR and SSIM, per clip.

Both take videos [B, T, H, W, C] with values in [0, max_val] and return one number per clip [B].
SSIM is the usual one (Wang et al. 2004): an 11 x 11 Gaussian window with sigma 1.5 (smaller on
frames under 11 pixels), K1 = 0.01, K2 = 0.03, computed per frame and channel over the valid
window positions and averaged over the clip.
"""

import jax
import jax.numpy as jnp
import numpy as np


def psnr(a: jax.Array, b: jax.Array, max_val: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB of each clip [B] (mean squared error over the clip)."""
  mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(max_val ** 2 / jnp.maximum(mse, 1e-10))


def _window(size: int, length: int, sigma: float = 1.5) -> np.ndarray:
  """[length - size + 1, length]: row i is the normalized Gaussian over pixels i .. i + size - 1."""
  g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
  g /= g.sum()
  out = np.zeros((length - size + 1, length), np.float32)
  for i in range(out.shape[0]):
    out[i, i:i + size] = g
  return out


def ssim(a: jax.Array, b: jax.Array, max_val: float = 1.0) -> jax.Array:
  """Structural similarity of each clip [B]: a, b [B, T, H, W, C] in [0, max_val]."""
  h, w = a.shape[2:4]
  size = min(11, h - (h + 1) % 2, w - (w + 1) % 2)      # odd, fits the frame
  wh, ww = jnp.asarray(_window(size, h)), jnp.asarray(_window(size, w))
  blur = lambda x: jnp.einsum("ih,bthwc,jw->btijc", wh, x, ww)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a ** 2
  var_b = blur(b * b) - mu_b ** 2
  cov = blur(a * b) - mu_a * mu_b
  c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3, 4))
