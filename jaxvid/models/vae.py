"""A causal 3D convolutional video VAE: the autoencoder that latent diffusion runs in.

  video [B, T, H, W, 3] in [-1, 1], T = 1 + tc k  (an image is T = 1)
    --Encoder--> moments [B, 1 + k, H/sc, W/sc, 2Z]: mean and log-variance of a diagonal Gaussian
    --sample or take the mean--> z [B, 1 + k, H/sc, W/sc, Z]
    --Decoder--> video [B, 1 + tc k, H, W, 3]

tc (`vae.temporal_compression`) and sc (`vae.spatial_compression`) are powers of two; Z is
`vae.latent_channels`. The encoder first folds p x p pixel patches into channels (p =
`vae.patch`, as LTX-Video's VAE does: convolutions then run at 1/p of the resolution, p^2 times
cheaper), then `conv_in`, one stage per resolution (`vae.blocks` residual blocks, then a
downsample, 2x in time and/or space: the last log2(tc) downsamples halve time and the last
log2(sc / p) halve space), one middle residual block, a norm and `conv_out`. The decoder
mirrors it and unfolds channels back into p x p patches. With `vae.shortcuts` every 2x
resampling and the latent itself also get a parameter-free shortcut (DC-AE's residual
autoencoding: averages of pixels, frame pairs or channel groups on the way down, repeats on the
way up; the p x p patch fold has none), so each learned resampling only adds a residual to a
fixed one; measured on the 32-wide S VAE: held-out PSNR 18.5 vs 13.7 dB at step 250.

Causal in time: every convolution sees only the current and earlier frames (the past is
zero-padded), and the temporal resampling keeps the first frame on its own. So latent frame 0
is frame 0 encoded alone, latent frame j >= 1 depends on frames <= tc j only, and decoded frame
t depends on latent frames <= ceil(t / tc) only. Norms never mix frames: `rms` normalizes each
position over its channels, `group` each frame over its pixels and a group of channels.

Bounded memory: each causal convolution takes and returns a cache, the input frames its next
window still needs (kt - 1 frames for stride 1, fewer for stride 2). Feeding a clip chunk by
chunk, carrying the caches, computes exactly what the whole clip does (vae_tiling.py scans
over chunks this way); `cache=None` starts a clip. Layout B T H W C throughout; parameters
are replicated over the mesh (a few MB), activations are split over the batch axes.
"""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from jaxvid.models import layers
from jaxvid.parallel import sharding as sh

LOGVAR_INIT = -6.0   # the posterior's initial log-variance (standard deviation 0.05)

# A cache is a nested list of arrays (and None where a layer keeps none), mirroring the modules.
Cache = list | None


def _constrain(x: jax.Array) -> jax.Array:
  """Activations [B, T, H, W, C] split over the batch axes of the mesh (no-op outside rules)."""
  return sh.constrain(x, (sh.BATCH, None, None, None, None))


def conv3d(x: jax.Array, kernel: jax.Array, stride: tuple[int, int, int], impl: str = "auto") -> jax.Array:
  """x [B, T, H, W, I] * kernel [kt, kh, kw, I, O] -> [B, (T - kt) // st + 1, ceil(H / sh),
  ceil(W / sw), O]: no padding in time (the caller pads causally), kh // 2 and kw // 2 zeros
  around space ('same' at stride 1).

  impl "3d" is one 3D convolution. "folded" stacks the kt frames of each window along channels
  and runs a 2D convolution over B T' frames with a kernel [kh, kw, kt I, O]: the same sums, which
  XLA:CPU runs up to 2.5x faster than its 3D convolution (measured on a 2-core CPU, forward +
  backward: a 3x3x3 conv of 48 channels at 9x8x8, batch 8, 59 -> 24 ms; of 64 channels 73 -> 48
  ms; the S VAE's train step at batch 8 0.84 -> 0.54 s), for kt times the input's memory. Its
  gradients are convolutions of the same layout (`_conv2d`), fast inside loops too.
  "auto": folded on CPU, 3d elsewhere (cuDNN and TPU run 3D convolutions natively).
  """
  if impl == "auto":
    impl = "folded" if jax.default_backend() == "cpu" else "3d"
  kt, kh, kw = kernel.shape[:3]
  st = stride[0]
  space = _padding((kh, kw))
  if impl == "3d":
    return jax.lax.conv_general_dilated(x, kernel, window_strides=stride, padding=[(0, 0)] + space,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  if impl != "folded":
    raise ValueError(f"conv3d impl {impl!r} is not one of auto, 3d, folded")
  b, t, h, w, c = x.shape
  windows = (t - kt) // st + 1
  if kt > 1 or st > 1:   # [B, T', H, W, kt I]: frame i of every window, i = 0 .. kt - 1
    x = jnp.concatenate([x[:, i:i + (windows - 1) * st + 1:st] for i in range(kt)], axis=-1)
  kernel = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, -1)
  y = _conv2d(x.reshape(b * windows, h, w, kt * c), kernel, tuple(stride[1:]))
  return y.reshape(b, windows, *y.shape[1:])


def _conv(x: jax.Array, kernel: jax.Array, padding, stride=(1, 1), **dilations) -> jax.Array:
  """The one layout of 2D convolution XLA:CPU runs fast everywhere: [N, H, W, I] * [kh, kw, I, O]."""
  return jax.lax.conv_general_dilated(x, kernel, stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      **dilations)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> jax.Array:
  """x [N, H, W, I] * kernel [kh, kw, I, O] (odd sides) -> [N, ceil(H / sh), ceil(W / sw), O]:
  kh // 2 and kw // 2 zeros around, windows every `stride` pixels.

  Its gradients are written as convolutions of the same layout. JAX's own transposes are
  convolutions with other dimension layouts, which XLA:CPU runs 8-60x slower inside a loop
  (lax.scan, as `train.steps_per_call` > 1 compiles the step; measured on a 2-core CPU: the
  kernel gradient of a 3x3 conv of 144 -> 48 channels at 36x8x8 took 25 ms in the entry
  program and 1,580 ms in a scan, 20 ms written this way; `jaxvid train` of the S VAE at 5
  steps a call took 2.97 s a step, now 0.19 s, against 0.22 s at one step a call).
  """
  return _conv(x, kernel, _padding(kernel.shape[:2]), stride)


def _padding(sides) -> list[tuple[int, int]]:
  """'Same' zero padding in space for kernel sides (kh, kw): n // 2 on each side."""
  return [(n // 2, n // 2) for n in sides]


def _conv2d_fwd(x, kernel, stride):
  return _conv2d(x, kernel, stride), (x, kernel)


def _conv2d_bwd(stride, res, dy):
  x, kernel = res
  size, out, pads = x.shape[1:3], dy.shape[1:3], [p for p, _ in _padding(kernel.shape[:2])]
  k = kernel.shape[:2]
  # dx: dy spread `stride` apart (lhs_dilation) through the kernel flipped, I and O swapped.
  dx = _conv(dy, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)),
             [(kn - 1 - p, n - 1 + p - s * (o - 1)) for n, kn, p, s, o in zip(size, k, pads, stride, out)],
             lhs_dilation=stride)
  # dk[a, b, i, o] = sum over n, h, w of x[n, sh h + a - ph, sw w + b - pw, i] dy[n, h, w, o]: x as
  # [I, H, W, N] (channels as the batch) through dy [H', W', N, O] spread `stride` apart as the kernel.
  dk = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)),
             [(p, kn + s * (o - 1) - n - p) for n, kn, p, s, o in zip(size, k, pads, stride, out)],
             rhs_dilation=stride)
  return dx, jnp.transpose(dk, (1, 2, 0, 3)).astype(kernel.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class CausalConv3d(nnx.Module):
  """x [B, T, H, W, Cin] -> [B, T', H', W', Cout]: kernel (kt, kh, kw), stride (st, sh, sw).

  Time is causal (windows end at the current frame; the clip starts with kt - 1 zero frames),
  space is zero-padded to 'same' (H' = H / sh). With stride st the windows start at input
  frames 0, st, 2 st, ... of the padded clip, so T = 1 + st k gives T' = 1 + k.
  """

  def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1), *, dtype, param_dtype):
    """The kernel starts at zero; `init_kernels` draws every kernel of a model at once."""
    self.kernel_size, self.stride, self.dtype = tuple(kernel), tuple(stride), dtype
    self.kernel = nnx.Param(jnp.zeros((*self.kernel_size, cin, cout), param_dtype))   # [kt, kh, kw, I, O]
    self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))

  def __call__(self, x: jax.Array, cache: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """x [B, T, H, W, Cin], cache [B, c, H, W, Cin] or None (start of a clip) -> (y, new cache).

    The new cache holds the frames from the start of the next window on, so the next call
    continues exactly where this one stopped. A kernel of one frame with stride 1 keeps none.
    """
    kt, st = self.kernel_size[0], self.stride[0]
    image = cache is None and x.shape[1] == 1 and kt > 1
    if kt > 1 or st > 1:
      if cache is None:
        cache = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
      x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
      windows = (x.shape[1] - kt) // st + 1
      cache = x[:, windows * st:]
      x = x[:, :(windows - 1) * st + kt]
    kernel = self.kernel[...].astype(self.dtype)
    if image:   # a clip's lone first frame: every tap but the last sees the zero past (kt times less work)
      y = conv3d(x[:, -1:].astype(self.dtype), kernel[-1:], (1, *self.stride[1:]))
    else:
      y = conv3d(x.astype(self.dtype), kernel, self.stride)
    return y + self.bias[...].astype(self.dtype), (cache if kt > 1 or st > 1 else None)


class RMSNorm(nnx.Module):
  """Each position over its channels: x / rms(x) * scale. Local in time and space."""

  def __init__(self, dim: int, *, groups: int, param_dtype, eps: float = 1e-6):
    del groups
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class FrameGroupNorm(nnx.Module):
  """GroupNorm of each frame on its own: statistics over (H, W, C / groups), never over T."""

  def __init__(self, dim: int, *, groups: int, param_dtype, eps: float = 1e-6):
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, t, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(2, 3, 5), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(2, 3, 5), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


NORMS = {"rms": RMSNorm, "group": FrameGroupNorm}


class ResBlock(nnx.Module):
  """x + conv(act(norm(conv(act(norm(x)))))), with a 1x1x1 projection when the width changes."""

  def __init__(self, cin: int, cout: int, *, norm: str, groups: int, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    nkw = dict(groups=groups, param_dtype=param_dtype)
    self.norm1 = NORMS[norm](cin, **nkw)
    self.conv1 = CausalConv3d(cin, cout, **kw)
    self.norm2 = NORMS[norm](cout, **nkw)
    self.conv2 = CausalConv3d(cout, cout, **kw)
    self.shortcut = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

  def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, list]:
    c1, c2 = cache or (None, None)
    h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
    h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
    skip = x if self.shortcut is None else self.shortcut(x)[0]
    return _constrain(skip + h), [c1, c2]


class Downsample(nnx.Module):
  """2x in space if `spatial` (a stride-2 3x3 conv), then 2x in time if `temporal` (a causal
  stride-2 conv over 3 frames: 1 + 2k frames -> 1 + k).

  With `shortcut` each conv adds a parameter-free shortcut of its input (as DC-AE's residual
  autoencoding): the 2x2 average in space; in time the first frame of a clip on its own, then
  the mean of each pair of frames. The chunk that starts the clip (no cache) has 1 + 2k frames
  and later chunks 2k (vae_tiling cuts whole latent frames), so pairs never cross a chunk
  boundary and need no cache; other lengths are refused."""

  def __init__(self, dim: int, temporal: bool, spatial: bool, *, shortcut: bool = False, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.spatial = CausalConv3d(dim, dim, (1, 3, 3), (1, 2, 2), **kw) if spatial else None
    self.temporal = CausalConv3d(dim, dim, (3, 1, 1), (2, 1, 1), **kw) if temporal else None
    self.shortcut = shortcut

  def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
    if self.spatial is not None:
      y, _ = self.spatial(x)
      if self.shortcut:
        b, t, h, w, c = x.shape
        y = y + x.reshape(b, t, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5)).astype(y.dtype)
      x = y
    if self.temporal is None:
      return x, None
    start = cache is None
    y, cache = self.temporal(x, cache)
    if self.shortcut:
      b, t, h, w, c = x.shape
      if t % 2 != start:
        raise ValueError(f"temporal downsample with shortcut got {t} frames in a chunk that "
                         f"{'starts' if start else 'continues'} the clip; it takes {'1 + 2k' if start else '2k'}")
      head, pairs = x[:, :int(start)], x[:, int(start):]
      pairs = pairs.reshape(b, pairs.shape[1] // 2, 2, h, w, c).mean(axis=2)
      y = y + jnp.concatenate([head, pairs], axis=1).astype(y.dtype)
    return y, cache


class Upsample(nnx.Module):
  """2x in time if `temporal` (a causal conv to 2C channels, each frame unfolded into two;
  the clip's very first frame stays one, so 1 + k frames -> 1 + 2k), then 2x in space if
  `spatial` (nearest neighbour, then a 3x3 conv). With `shortcut` each adds its input repeated
  (each frame twice, each pixel 2x2), the inverse of Downsample's shortcut."""

  def __init__(self, dim: int, temporal: bool, spatial: bool, *, shortcut: bool = False, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.temporal = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw) if temporal else None
    self.spatial = CausalConv3d(dim, dim, (1, 3, 3), **kw) if spatial else None
    self.shortcut = shortcut

  def __call__(self, x: jax.Array, cache: Cache = None, first: bool = True) -> tuple[jax.Array, Cache]:
    if self.temporal is not None:
      y, cache = self.temporal(x, cache)
      b, t, h, w, c2 = y.shape
      y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
      if self.shortcut:
        y = y + jnp.repeat(x, 2, axis=1).astype(y.dtype)
      x = y[:, 1:] if first else y   # the clip's first latent frame decodes to one frame
    if self.spatial is not None:
      up = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
      y, _ = self.spatial(up)
      x = y + up.astype(y.dtype) if self.shortcut else y
    return x, cache


def num_stages(vae_cfg: ml_collections.ConfigDict) -> int:
  """Resolutions the encoder runs at: one more than the downsamples, max(log2(tc), log2(sc / p))."""
  v = vae_cfg
  return 1 + max(int(math.log2(v.temporal_compression)), int(math.log2(v.spatial_compression // v.patch)))


def _stages(vae_cfg: ml_collections.ConfigDict) -> tuple[list[int], list[tuple[bool, bool]]]:
  """Widths of the stages, and for each downsample between them whether it halves (time,
  space): the last log2(tc) halve time and the last log2(sc / p) space (at low resolution)."""
  v = vae_cfg
  widths = [v.channels * m for m in v.channel_mult]
  downs = num_stages(v) - 1
  temporal, spatial = int(math.log2(v.temporal_compression)), int(math.log2(v.spatial_compression // v.patch))
  return widths, [(i >= downs - temporal, i >= downs - spatial) for i in range(downs)]


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """[B, T, H, W, C] -> [B, T, H/p, W/p, p p C]: each p x p patch folded into channels."""
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """[B, T, H, W, p p C] -> [B, T, H p, W p, C] (inverse of space_to_depth)."""
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h, w, p, p, c // (p * p)).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, h * p, w * p, c // (p * p))


def _kwargs(vae_cfg: ml_collections.ConfigDict) -> dict:
  return dict(dtype=jnp.dtype(vae_cfg.dtype), param_dtype=jnp.dtype(vae_cfg.param_dtype))


class Encoder(nnx.Module):
  """video [B, T, H, W, 3] -> moments [B, T', H', W', 2Z] (mean, then log-variance)."""

  def __init__(self, vae_cfg: ml_collections.ConfigDict):
    v = vae_cfg
    kw, bkw = _kwargs(v), dict(norm=v.norm, groups=v.groups, **_kwargs(v))
    widths, halves = _stages(v)
    self.patch = v.patch
    self.conv_in = CausalConv3d(3 * v.patch ** 2, widths[0], **kw)
    blocks, downs, width = [], [], widths[0]
    for i, w in enumerate(widths):
      for _ in range(v.blocks):
        blocks.append(ResBlock(width, w, **bkw))
        width = w
      if i < len(widths) - 1:
        downs.append(Downsample(w, *halves[i], shortcut=v.shortcuts, **kw))
    self.blocks, self.downs = nnx.List(blocks), nnx.List(downs)
    self.mid = ResBlock(width, width, **bkw)
    self.norm_out = NORMS[v.norm](width, groups=v.groups, param_dtype=kw["param_dtype"])
    self.conv_out = CausalConv3d(width, 2 * v.latent_channels, **kw)
    self.per_stage, self.shortcuts = v.blocks, v.shortcuts

  def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, list]:
    """x [B, T, H, W, 3]; cache from the previous chunk of the same clips, or None."""
    c = cache or [None, [None] * len(self.blocks), [None] * len(self.downs), None, None]
    x, c_in = self.conv_in(_constrain(space_to_depth(x, self.patch)), c[0])
    c_blocks, c_downs = list(c[1]), list(c[2])
    for i, block in enumerate(self.blocks):
      x, c_blocks[i] = block(x, c_blocks[i])
      stage = i // self.per_stage
      if (i + 1) % self.per_stage == 0 and stage < len(self.downs):
        x, c_downs[stage] = self.downs[stage](x, c_downs[stage])
    x, c_mid = self.mid(x, c[3])
    moments, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c[4])
    moments = moments.astype(jnp.float32)
    if self.shortcuts:   # the mean also gets the features averaged over groups of width / Z channels
      z = moments.shape[-1] // 2
      shortcut = x.astype(jnp.float32).reshape(*x.shape[:-1], z, x.shape[-1] // z).mean(-1)
      moments = jnp.concatenate([moments[..., :z] + shortcut, moments[..., z:]], axis=-1)
    return moments, [c_in, c_blocks, c_downs, c_mid, c_out]


class Decoder(nnx.Module):
  """z [B, T', H', W', Z] -> video [B, T, H, W, 3] (unbounded; about [-1, 1] once trained)."""

  def __init__(self, vae_cfg: ml_collections.ConfigDict):
    v = vae_cfg
    kw, bkw = _kwargs(v), dict(norm=v.norm, groups=v.groups, **_kwargs(v))
    widths, halves = _stages(v)
    width = widths[-1]
    self.conv_in = CausalConv3d(v.latent_channels, width, **kw)
    self.mid = ResBlock(width, width, **bkw)
    blocks, ups = [], []
    for i in reversed(range(len(widths))):     # stage i, then the upsample to stage i - 1
      for _ in range(v.blocks + 1):
        blocks.append(ResBlock(width, widths[i], **bkw))
        width = widths[i]
      if i > 0:
        ups.append(Upsample(width, *halves[i - 1], shortcut=v.shortcuts, **kw))
    self.blocks, self.ups = nnx.List(blocks), nnx.List(ups)
    self.norm_out = NORMS[v.norm](width, groups=v.groups, param_dtype=kw["param_dtype"])
    self.conv_out = CausalConv3d(width, 3 * v.patch ** 2, **kw)
    self.per_stage, self.patch, self.shortcuts = v.blocks + 1, v.patch, v.shortcuts

  def __call__(self, z: jax.Array, cache: Cache = None, first: bool = True) -> tuple[jax.Array, list]:
    """z [B, T', H', W', Z]; `first`: this chunk starts the clip (its first latent frame decodes
    to one frame); cache from the previous chunk, or None."""
    c = cache or [None, None, [None] * len(self.blocks), [None] * len(self.ups), None]
    x, c_in = self.conv_in(_constrain(z), c[0])
    if self.shortcuts:   # each latent channel repeated over width / Z channels (the inverse of the encoder's)
      x = x + jnp.repeat(z, x.shape[-1] // z.shape[-1], axis=-1).astype(x.dtype)
    x, c_mid = self.mid(x, c[1])
    c_blocks, c_ups = list(c[2]), list(c[3])
    for i, block in enumerate(self.blocks):
      x, c_blocks[i] = block(x, c_blocks[i])
      stage = i // self.per_stage
      if (i + 1) % self.per_stage == 0 and stage < len(self.ups):
        x, c_ups[stage] = self.ups[stage](x, c_ups[stage], first)
    x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c[4])
    return depth_to_space(x.astype(jnp.float32), self.patch), [c_in, c_mid, c_blocks, c_ups, c_out]


class Discriminator(nnx.Module):
  """A 3D patch discriminator (for `vae.adversarial` > 0): video [B, T, H, W, 3] -> logits
  [B, T, H/8, W/8, 1], one per overlapping spacetime patch; three stride-2 convs, leaky ReLU."""

  def __init__(self, channels: int, *, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    widths = [3, channels, 2 * channels, 4 * channels]
    self.convs = nnx.List([CausalConv3d(cin, cout, (3, 3, 3), (1, 2, 2), **kw)
                           for cin, cout in zip(widths[:-1], widths[1:])])
    self.conv_out = CausalConv3d(widths[-1], 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = jax.nn.leaky_relu(conv(_constrain(x))[0], 0.2)
    return self.conv_out(x)[0].astype(jnp.float32)


class VAE(nnx.Module):
  """The encoder and decoder (and, for an adversarial loss, a discriminator); whole clips here,
  chunks and tiles in vae_tiling.py."""

  def __init__(self, vae_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    self.encoder = Encoder(vae_cfg)
    self.decoder = Decoder(vae_cfg)
    first_width = vae_cfg.channels * vae_cfg.channel_mult[0]
    self.discriminator = Discriminator(first_width, **_kwargs(vae_cfg)) if vae_cfg.adversarial > 0 else None
    self.latent_channels = z = vae_cfg.latent_channels
    init_kernels(self, rngs.params())
    # Start with a narrow posterior (the decoder sees the means from the first step; with a small KL
    # weight unit variance would take thousands of Adam steps to shrink) and a zero (gray) output.
    self.encoder.conv_out.kernel[..., z:] = 0.0
    self.encoder.conv_out.bias[z:] = LOGVAR_INIT
    self.decoder.conv_out.kernel[...] = 0.0

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """video [B, T, H, W, 3] in [-1, 1] -> (mean, log-variance), each [B, T', H', W', Z]."""
    return split_moments(self.encoder(x)[0])

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B, T', H', W', Z] -> video [B, T, H, W, 3]."""
    return self.decoder(z)[0]

  def __call__(self, x: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reconstruction through a posterior sample: x -> (x_hat, mean, log-variance)."""
    mean, logvar = self.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)
    return self.decode(z), mean, logvar


def init_kernels(model: nnx.Module, key: jax.Array) -> None:
  """Fills every convolution kernel [kt, kh, kw, I, O] of `model` with U(-a, a), a = sqrt(3 / fan_in)
  (unit-variance outputs for unit-variance inputs), from one random draw for the whole model:
  XLA compiles the random number generator once instead of once per layer (measured: 30 s -> a
  few seconds to compile the initialization of a small VAE on a 2-core CPU)."""
  kernels = [p for _, p in nnx.iter_graph(model) if isinstance(p, nnx.Param) and p.ndim == 5]
  draws = jax.random.uniform(key, (sum(p.size for p in kernels),), jnp.float32, -1.0, 1.0)
  offset = 0
  for p in kernels:
    fan_in = math.prod(p.shape[:-1])
    p[...] = (draws[offset:offset + p.size].reshape(p.shape) * math.sqrt(3.0 / fan_in)).astype(p.dtype)
    offset += p.size


def trained_on_images(run_cfg: ml_collections.ConfigDict) -> bool:
  """Whether a VAE run's config gives it only 1-frame clips (video.frames, or every data.buckets
  entry), so that its temporal layers never trained (see `inflate_from_images`)."""
  specs = run_cfg.data.buckets or ((run_cfg.video.frames,),)
  return all((tuple(s) if isinstance(s, (tuple, list)) else (s,))[0] == 1 for s in specs)


def inflate_from_images(model: VAE) -> None:
  """Turns a VAE trained on images (1-frame clips) into the video VAE that codes every frame as
  it coded images, in place; video training then starts from there (image-then-video, as
  MAGVIT-v2 and CV-VAE train theirs).

  A 1-frame clip reaches only the last temporal tap of each causal kernel (the past is zero
  padding) and only the second of the two frames each temporal upsample unfolds (the clip's
  first frame decodes alone), so image training leaves the earlier taps and the first frame's
  channels at their random start. Here the earlier taps become zero (each frame is coded on
  its own; the temporal downsample takes the last frame of each pair, plus the shortcut's
  mean of the pair) and each temporal upsample's first frame copies the second (a latent frame
  decodes into repeats of the frame it was coded from). Kernels are [kt, kh, kw, I, O].
  """
  for _, module in nnx.iter_graph(model):
    if isinstance(module, CausalConv3d) and module.kernel_size[0] > 1:
      module.kernel[:-1] = 0.0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, Upsample) and module.temporal is not None:
      conv, half = module.temporal, module.temporal.kernel.shape[-1] // 2
      conv.kernel[..., :half] = conv.kernel[..., half:]
      conv.bias[:half] = conv.bias[half:]


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., 2Z] -> mean [..., Z], log-variance [..., Z] (clipped to [-30, 20] as usual)."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged: a scalar."""
  return 0.5 * layers.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def latent_shape(vae_cfg: ml_collections.ConfigDict, frames: int, height: int, width: int) -> tuple[int, ...]:
  """(T', H', W', Z) of a (frames, height, width) clip: (1 + (T - 1) / tc, H / sc, W / sc, Z)."""
  tc, sc = vae_cfg.temporal_compression, vae_cfg.spatial_compression
  return (1 + (frames - 1) // tc, height // sc, width // sc, vae_cfg.latent_channels)


def build(cfg: ml_collections.ConfigDict, seed: int = 0) -> VAE:
  """The VAE of `cfg.vae` (a `model.name = "vae"` config)."""
  return VAE(cfg.vae, nnx.Rngs(params=seed))
