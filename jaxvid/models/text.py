"""Text conditioning that needs no download: a small transformer trained with the model, over
bytes (`text.encoder = "bytes"`: any language, any spelling) or hashed words ("words": each word
is one token, which a small model learns to read faster than spelled-out bytes).

Any text encoder plugs in through the same two pieces: a tokenizer that runs in the data
pipeline (numpy, no JAX) and a module mapping tokens to embeddings. A pretrained encoder
(e.g. umT5 for Wan 2.1 weights) implements `Tokenizer` and `TextEncoder` the same way.
"""

import re
from typing import Protocol
import zlib

import jax
from flax import nnx
import ml_collections
import numpy as np

from jaxvid.models import attention, layers
from jaxvid.parallel import sharding as sh

PAD, BOS = 0, 1
BYTE_VOCAB = 258  # PAD, BOS, then the 256 byte values


class Tokenizer(Protocol):
  max_len: int

  def __call__(self, texts: list[str]) -> np.ndarray:
    """texts -> int32 [B, max_len]."""


class TextEncoder(Protocol):
  width: int

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens int32 [B, L] -> (embeddings [B, L, width], mask bool [B, L])."""


class ByteTokenizer:
  """UTF-8 bytes, offset by 2, after a BOS token; padded with 0 and cut to `max_len`.

  The empty caption is [BOS], so the unconditional input always has one valid key.
  """

  def __init__(self, max_len: int):
    self.max_len = max_len

  def __call__(self, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.max_len), np.int32)
    for i, text in enumerate(texts):
      ids = [BOS] + [b + 2 for b in text.encode("utf-8")][: self.max_len - 1]
      out[i, : len(ids)] = ids
    return out

  def truncates(self, text: str) -> bool:
    return len(text.encode("utf-8")) > self.max_len - 1


class WordTokenizer:
  """Lower-cased words (runs of letters and digits) hashed into `vocab - 2` buckets, offset by
  2, after a BOS token; padded with 0 and cut to `max_len`. CRC-32 makes the ids the same in
  every process and Python version. Different words may share a bucket; with the default
  vocab the synthetic captions' words do not.
  """

  def __init__(self, max_len: int, vocab: int):
    self.max_len, self.vocab = max_len, vocab

  def words(self, text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())

  def __call__(self, texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), self.max_len), np.int32)
    for i, text in enumerate(texts):
      ids = [BOS] + [2 + zlib.crc32(w.encode("utf-8")) % (self.vocab - 2) for w in self.words(text)]
      ids = ids[: self.max_len]
      out[i, : len(ids)] = ids
    return out

  def truncates(self, text: str) -> bool:
    return len(self.words(text)) > self.max_len - 1


class _Block(nnx.Module):
  """Pre-LN transformer block over text tokens [B, L, W]."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype, rngs: nnx.Rngs):
    t = cfg.text
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.layer_norm(t.width, eps=cfg.model.eps, affine=True, **kw)
    self.attn = attention.Attention(t.width, t.heads, qk_norm=False, eps=cfg.model.eps,
                                    backend=cfg.model.attention, dtype=dtype, **kw)
    self.norm2 = layers.layer_norm(t.width, eps=cfg.model.eps, affine=True, **kw)
    self.mlp = layers.MLP(t.width, t.mlp_dim, dtype=dtype, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x).astype(x.dtype), kv_mask=mask)
    return x + self.mlp(self.norm2(x).astype(x.dtype))


class TransformerTextEncoder(nnx.Module):
  """tokens int32 [B, L] (bytes or hashed words) -> (embeddings [B, L, text.width] float32, mask [B, L])."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype, rngs: nnx.Rngs):
    t = cfg.text
    self.width = t.width
    self.embed = nnx.Embed(vocab_size(cfg), t.width, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02),
                                                                (sh.VOCAB, sh.EMBED)),
                           rngs=rngs)
    self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (t.max_len, t.width), param_dtype),
                         out_sharding=(None, sh.EMBED))
    self.blocks = nnx.List([_Block(cfg, dtype, param_dtype, rngs) for _ in range(t.depth)])
    self.norm = layers.layer_norm(t.width, eps=cfg.model.eps, affine=True, param_dtype=param_dtype,
                                  rngs=rngs)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    mask = tokens != PAD
    x = self.embed(tokens) + self.pos[: tokens.shape[1]].astype(self.embed.dtype)
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x), mask


def vocab_size(cfg: ml_collections.ConfigDict) -> int:
  return BYTE_VOCAB if cfg.text.encoder == "bytes" else cfg.text.vocab


def make_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
  if cfg.text.encoder == "bytes":
    return ByteTokenizer(cfg.text.max_len)
  if cfg.text.encoder == "words":
    return WordTokenizer(cfg.text.max_len, cfg.text.vocab)
  raise ValueError(f"unknown text.encoder {cfg.text.encoder!r}")


def make_encoder(cfg: ml_collections.ConfigDict, dtype, param_dtype, rngs: nnx.Rngs) -> TextEncoder:
  """The same transformer reads either tokenizer's ids (`config.validate` checks text.encoder)."""
  return TransformerTextEncoder(cfg, dtype, param_dtype, rngs)
