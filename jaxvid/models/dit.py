"""The spacetime diffusion transformer (DiT), laid out like Wan 2.1's transformer.

  video [B, T, H, W, C] (+ known mask [B, T, H, W, 1] with model.condition = "mask")
        --3D patches--> tokens [B, N, D], N = (T/pt)(H/ph)(W/pw)
                                          (+ fixed 3D sin-cos positions if model.pos_embed)
  text tokens [B, L] --text encoder + MLP--> context [B, L, D]
  flow time t [B] --sinusoid + MLP--> temb [B, D] --SiLU + Linear--> 6 modulations [B, 6, D]
  depth x block (scanned):  adaLN(self-attention with 3D RoPE and RMS QK-norm)
                            + cross-attention to the text + adaLN(GELU MLP)
  final adaLN + Linear --unpatchify--> velocity [B, T, H, W, C]

With model.condition = "mask" the known mask is one more input channel, and tokens given whole
(clean data) are modulated as at t = 0 while the others are modulated at t.

Each block adds its own learned offsets [6, D] to the shared modulations (Wan's
`scale_shift_table`); modulation, gates and the output layer start at zero (adaLN-zero), so
the untrained network is the identity on its token stream. Parameter names follow the
diffusers `WanTransformer3DModel` so that importing its weights is a mapping of names and
reshapes (the patch embedding there is a Conv3d with kernel = stride = patch).
"""

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from jaxvid import config as config_lib
from jaxvid.models import attention, layers, rope, text
from jaxvid.parallel import sharding as sh

_policies = jax.checkpoint_policies
_dense = _policies.save_only_these_names(layers.DENSE)   # dense products that are custom VJPs (CPU bf16)
REMAT = {
    "full": None,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots, _dense),
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable, _dense),
}


def patchify(x: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
  """[B, T, H, W, C] -> [B, N, pt*ph*pw*C], tokens in (t, h, w) raster order."""
  b, t, h, w, c = x.shape
  pt, ph, pw = patch
  x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(x: jax.Array, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> jax.Array:
  """[B, N, pt*ph*pw*C] -> [B, T, H, W, C] (inverse of `patchify`)."""
  b = x.shape[0]
  (gt, gh, gw), (pt, ph, pw) = grid, patch
  x = x.reshape(b, gt, gh, gw, pt, ph, pw, -1)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, gt * pt, gh * ph, gw * pw, -1)


class Block(nnx.Module):
  """One transformer block on x [B, N, D], modulated by e [B, 6, D]."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype, rngs: nnx.Rngs):
    m = cfg.model
    d = m.width
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    attn = lambda **a: attention.Attention(d, m.heads, qk_norm=m.qk_norm, eps=m.eps, backend=m.attention,
                                           dtype=dtype, **kw, **a)
    self.norm1 = layers.layer_norm(d, eps=m.eps, affine=False, **kw)
    self.attn1 = attn(context_parallel=m.context_parallel)
    self.norm2 = layers.layer_norm(d, eps=m.eps, affine=m.cross_attn_norm, **kw)
    self.attn2 = attn()
    self.norm3 = layers.layer_norm(d, eps=m.eps, affine=False, **kw)
    self.ffn = layers.MLP(d, m.mlp_dim, dtype=dtype, **kw)
    self.scale_shift_table = nnx.Param(jnp.zeros((6, d), param_dtype), out_sharding=(None, sh.EMBED))

  def __call__(self, x: jax.Array, e: jax.Array, angles: jax.Array, context: jax.Array,
               context_mask: jax.Array, clean: jax.Array | None = None, e_clean: jax.Array | None = None
               ) -> jax.Array:
    """x [B, N, D] float32, e [B, 6, D], angles [N, K/2], context [B, L, D] -> [B, N, D].

    clean [B, N, 1] (1: a token given clean) and e_clean [B, 6, D] (the modulations at t = 0):
    clean tokens are modulated as at t = 0, the others by e.
    """
    e = e + self.scale_shift_table[None].astype(jnp.float32)
    if clean is None:
      mods = jnp.split(e, 6, axis=1)                                         # each [B, 1, D]
    else:
      e_clean = e_clean + self.scale_shift_table[None].astype(jnp.float32)
      mods = [m + clean * (m0 - m) for m, m0 in zip(jnp.split(e, 6, axis=1), jnp.split(e_clean, 6, axis=1))]
    shift1, scale1, gate1, shift2, scale2, gate2 = mods                      # each [B, 1 or N, D]
    h = self.norm1(x) * (1 + scale1) + shift1
    x = x + gate1 * self.attn1(h, angles=angles)
    x = x + self.attn2(self.norm2(x), context=context, kv_mask=context_mask)
    h = self.norm3(x) * (1 + scale2) + shift2
    x = x + gate2 * self.ffn(h)
    return sh.constrain(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))


class DiT(nnx.Module):
  """Velocity model v(x_t, t, text): see the module docstring for the data flow."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    m = cfg.model
    d, self.patch = m.width, tuple(m.patch)
    self.heads, self.freq_dim, self.rope_theta = m.heads, m.freq_dim, m.rope_theta
    self.remat, self.pos_embed, self.condition = m.remat, m.pos_embed, m.condition
    self.scan_unroll = m.scan_unroll
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    in_dim, patch_dim = config_lib.patch_dims(cfg)

    self.text_encoder = text.make_encoder(cfg, dtype, param_dtype, rngs)
    self.patch_embedding = layers.dense(in_dim, d, (None, sh.EMBED), **kw)
    self.text_embedding_1 = layers.dense(cfg.text.width, d, (None, sh.EMBED), **kw)
    self.text_embedding_2 = layers.dense(d, d, (sh.MLP, sh.EMBED), **kw)
    self.time_embedding_1 = layers.dense(m.freq_dim, d, (None, sh.EMBED), **kw)
    self.time_embedding_2 = layers.dense(d, d, (sh.MLP, sh.EMBED), **kw)
    self.time_projection = layers.dense(d, 6 * d, (sh.EMBED, sh.MLP), zero_init=True, **kw)

    @nnx.split_rngs(splits=m.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: sh.LAYERS})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, dtype, param_dtype, rngs)

    self.blocks = make_blocks(rngs)
    self.norm_out = layers.layer_norm(d, eps=m.eps, affine=False, param_dtype=param_dtype, rngs=rngs)
    self.scale_shift_table = nnx.Param(jnp.zeros((2, d), param_dtype), out_sharding=(None, sh.EMBED))
    self.proj_out = layers.dense(d, patch_dim, (sh.EMBED, None), zero_init=True, **kw)

  def encode_text(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens int32 [B, L] -> (text embeddings [B, L, text.width], mask bool [B, L])."""
    return self.text_encoder(tokens)

  def __call__(self, x: jax.Array, t: jax.Array, text_emb: jax.Array, text_mask: jax.Array,
               known_mask: jax.Array | None = None) -> jax.Array:
    """x [B, T, H, W, C], t [B] in [0, 1], text_emb [B, L, Wt], text_mask [B, L] -> v [B, T, H, W, C].

    known_mask [B, T, H, W, 1]: with model.condition = "mask", 1 where x holds given clean values
    (conditioning.apply); None means nothing is known.
    """
    b, frames, height, width, _ = x.shape
    clean = None
    if self.condition == "mask":
      known_mask = (jnp.zeros(x.shape[:-1] + (1,), x.dtype) if known_mask is None
                    else known_mask.astype(x.dtype))
      x = jnp.concatenate([x, known_mask], axis=-1)
      # Tokens given whole are clean data: they are modulated as at t = 0 (as in diffusion forcing).
      clean = patchify(known_mask, self.patch).min(axis=-1, keepdims=True).astype(jnp.float32)   # [B, N, 1]
      clean = sh.constrain(clean, (sh.BATCH, sh.LENGTH, None))
      t = jnp.concatenate([t, jnp.zeros_like(t)])                             # [2B]: at t, and at 0
    grid = (frames // self.patch[0], height // self.patch[1], width // self.patch[2])
    tokens = self.patch_embedding(patchify(x, self.patch)).astype(jnp.float32)     # [B, N, D]
    if self.pos_embed == "sincos":
      tokens = tokens + rope.sincos_embedding(grid, tokens.shape[-1], self.rope_theta)[None]
    tokens = sh.constrain(tokens, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
    context = self.text_embedding_2(jax.nn.gelu(self.text_embedding_1(text_emb), approximate=True))
    temb = self.time_embedding_2(jax.nn.silu(self.time_embedding_1(layers.timestep_features(t, self.freq_dim))))
    e = self.time_projection(jax.nn.silu(temb)).astype(jnp.float32).reshape(t.shape[0], 6, -1)   # [B (2B), 6, D]
    temb = temb.astype(jnp.float32)
    e_clean = temb_clean = None
    if clean is not None:
      (e, e_clean), (temb, temb_clean) = jnp.split(e, 2), jnp.split(temb, 2)
    angles = rope.rope_angles(grid, tokens.shape[-1] // self.heads, self.rope_theta)   # [N, K/2]

    graphdef, stacked = nnx.split(self.blocks)

    def body(h, block_state):
      block = nnx.merge(graphdef, block_state)
      return block(h, e, angles, context, text_mask, clean, e_clean), None

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT[self.remat], prevent_cse=False)
    tokens, _ = jax.lax.scan(body, tokens, stacked, unroll=self.scan_unroll)

    table = self.scale_shift_table[None].astype(jnp.float32)
    shift, scale = jnp.split(table + temb[:, None], 2, axis=1)                   # [B, 1, D] each
    if clean is not None:
      shift_clean, scale_clean = jnp.split(table + temb_clean[:, None], 2, axis=1)
      shift, scale = shift + clean * (shift_clean - shift), scale + clean * (scale_clean - scale)   # [B, N, D]
    out = self.proj_out(self.norm_out(tokens) * (1 + scale) + shift)
    return unpatchify(out.astype(jnp.float32), grid, self.patch)


def build(cfg: ml_collections.ConfigDict, seed: int = 0) -> DiT:
  return DiT(cfg, nnx.Rngs(params=seed))
