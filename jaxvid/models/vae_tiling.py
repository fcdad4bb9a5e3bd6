"""Encode and decode with bounded memory: temporal chunks with a causal cache, spatial tiles.

Temporal chunks (exact). A clip of 1 + tc k frames has 1 + k latent frames. With `chunk = c`
the first chunk is 1 + (k mod c) latent frames (1 + tc (k mod c) pixel frames) and every later
one c latent frames (tc c pixel frames); a `lax.scan` runs the encoder or decoder chunk after
chunk, carrying each causal convolution's cache (models/vae.py). Memory then depends on the
chunk, not the clip, and so does the compiled program (one compile per clip length). Every layer is
causal and no norm mixes frames, so the chunked result is the whole-clip result up to float
reassociation (convolutions over other shapes sum in another order: about 1e-6 relative in f32).

Spatial tiles (approximate). With `tile = n` the latent grid is cut into tiles of n x n cells
(pixel tiles of n sc x n sc) that overlap by at least `tile_overlap` cells, spaced evenly so
all tiles have one shape; each tile is encoded or decoded on its own (after the other, in a
`lax.scan`), and overlapping tiles are blended with weights that ramp linearly across the
overlap. A tile's border sees zero padding where the whole frame has its neighbours, so
outputs differ from the whole-frame result within the decoder's receptive field of a tile
edge; the ramp gives those pixels little weight. Away from tile edges the result is exact.
"""

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to cut clips: `chunk` latent frames per chunk after the first (0: whole clips),
  `tile` latent cells per tile side (0: whole frames) overlapping by `overlap` cells; `tc`
  and `sc` are the VAE's temporal and spatial compression."""
  tc: int = 4
  sc: int = 8
  chunk: int = 0
  tile: int = 0
  overlap: int = 2


def time_chunks(latent_frames: int, chunk: int) -> tuple[int, int]:
  """(latent frames of the first chunk, number of later chunks of `chunk` latent frames)."""
  if chunk <= 0 or latent_frames <= 1:
    return latent_frames, 0
  return 1 + (latent_frames - 1) % chunk, (latent_frames - 1) // chunk


def _scan_chunks(module: nnx.Module, x: jax.Array, first_len: int, chunks: int, step: int, **first_kw):
  """Runs module(x_chunk, cache, ...) -> (y, cache) over x [B, T, ...] in time: the first
  `first_len` frames, then `chunks` chunks of `step` frames, carrying the cache."""
  y0, cache = module(x[:, :first_len], None, **first_kw)
  if not chunks:
    return y0
  graphdef, state = nnx.split(module)
  b = x.shape[0]
  rest = x[:, first_len:].reshape(b, chunks, step, *x.shape[2:]).swapaxes(0, 1)   # [n, B, step, ...]

  def body(carry, xs):
    y, carry = nnx.merge(graphdef, state)(xs, carry, **{k: False for k in first_kw})
    return carry, y

  _, ys = jax.lax.scan(body, cache, rest)                                          # [n, B, t, ...]
  ys = ys.swapaxes(0, 1).reshape(b, chunks * ys.shape[2], *ys.shape[3:])
  return jnp.concatenate([y0, ys], axis=1)


def encode_chunked(encoder: nnx.Module, video: jax.Array, plan: Plan) -> jax.Array:
  """video [B, 1 + tc k, H, W, 3] -> moments [B, 1 + k, H/sc, W/sc, 2Z], chunk by chunk."""
  latent_frames = 1 + (video.shape[1] - 1) // plan.tc
  first, chunks = time_chunks(latent_frames, plan.chunk)
  return _scan_chunks(encoder, video, 1 + plan.tc * (first - 1), chunks, plan.tc * plan.chunk)


def decode_chunked(decoder: nnx.Module, z: jax.Array, plan: Plan) -> jax.Array:
  """z [B, 1 + k, H', W', Z] -> video [B, 1 + tc k, H' sc, W' sc, 3], chunk by chunk."""
  first, chunks = time_chunks(z.shape[1], plan.chunk)
  return _scan_chunks(decoder, z, first, chunks, plan.chunk, first=True)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Starts of equal tiles of `tile` cells covering `size` cells, overlapping by >= `overlap`."""
  if tile <= 0 or size <= tile:
    return [0]
  n = math.ceil((size - overlap) / (tile - overlap))
  return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramps(starts: list[int], tile: int, scale: int) -> np.ndarray:
  """Blend weights [len(starts), tile * scale] along one axis: 1 inside, rising linearly over
  the overlap with the previous tile and falling over the overlap with the next."""
  n = tile * scale
  pos = np.arange(n) + 0.5
  out = np.ones((len(starts), n), np.float32)
  for k, s in enumerate(starts):
    before = starts[k - 1] + tile - s if k > 0 else 0
    after = s + tile - starts[k + 1] if k < len(starts) - 1 else 0
    if before > 0:
      out[k] = np.minimum(out[k], pos / (before * scale))
    if after > 0:
      out[k] = np.minimum(out[k], (n - pos) / (after * scale))
  return out


def _tiled(fn, x: jax.Array, grid: tuple[int, int], plan: Plan, scale_in: int, scale_out: int, out_shape):
  """Applies fn to overlapping tiles of x [B, T, H, W, C] (tiles in units of latent cells;
  x has scale_in pixels a cell, fn's output scale_out) and blends the results into out_shape."""
  gh, gw = grid
  th, tw = min(plan.tile, gh), min(plan.tile, gw)
  ys, xs = tile_starts(gh, plan.tile, plan.overlap), tile_starts(gw, plan.tile, plan.overlap)
  wy, wx = _ramps(ys, th, scale_out), _ramps(xs, tw, scale_out)
  weights = np.einsum("ih,jw->ijhw", wy, wx).reshape(len(ys) * len(xs), th * scale_out, tw * scale_out)
  total = np.zeros(out_shape[2:4], np.float32)
  for k, (y, x0) in enumerate((y, x0) for y in ys for x0 in xs):
    total[y * scale_out:(y + th) * scale_out, x0 * scale_out:(x0 + tw) * scale_out] += weights[k]
  starts = np.array([(y, x0) for y in ys for x0 in xs], np.int32)

  def body(out, tile_info):
    (y, x0), w = tile_info
    tile = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(x, y * scale_in, th * scale_in, 2),
                                        x0 * scale_in, tw * scale_in, 3)
    part = fn(tile) * w[None, None, :, :, None]
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, y * scale_out, x0 * scale_out, zero)
    return jax.lax.dynamic_update_slice(out, jax.lax.dynamic_slice(out, at, part.shape) + part, at), None

  out, _ = jax.lax.scan(body, jnp.zeros(out_shape, jnp.float32), (jnp.asarray(starts), jnp.asarray(weights)))
  return out / jnp.asarray(total)[None, None, :, :, None]


def encode(encoder: nnx.Module, video: jax.Array, plan: Plan) -> jax.Array:
  """video [B, T, H, W, 3] -> moments [B, T', H/sc, W/sc, 2Z], in chunks and tiles per `plan`."""
  grid = (video.shape[2] // plan.sc, video.shape[3] // plan.sc)
  if plan.tile <= 0 or max(grid) <= plan.tile:
    return encode_chunked(encoder, video, plan)
  b, t = video.shape[:2]
  out_shape = (b, 1 + (t - 1) // plan.tc, *grid, encoder.conv_out.kernel.shape[-1])
  graphdef, state = nnx.split(encoder)
  fn = lambda tile: encode_chunked(nnx.merge(graphdef, state), tile, plan)
  return _tiled(fn, video, grid, plan, plan.sc, 1, out_shape)


def decode(decoder: nnx.Module, z: jax.Array, plan: Plan) -> jax.Array:
  """z [B, T', H', W', Z] -> video [B, T, H' sc, W' sc, 3], in chunks and tiles per `plan`."""
  grid = z.shape[2:4]
  if plan.tile <= 0 or max(grid) <= plan.tile:
    return decode_chunked(decoder, z, plan)
  b, t = z.shape[:2]
  out_shape = (b, 1 + (t - 1) * plan.tc, grid[0] * plan.sc, grid[1] * plan.sc, 3)
  graphdef, state = nnx.split(decoder)
  fn = lambda tile: decode_chunked(nnx.merge(graphdef, state), tile, plan)
  return _tiled(fn, z, grid, plan, 1, plan.sc, out_shape)
