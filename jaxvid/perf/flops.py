"""Model FLOPs from the architecture: what MFU is measured against.

Counts the multiply-adds of every matrix product (2 FLOPs each), which is what accelerators
are rated for: the linear layers and the two attention products (q k^T and p v) of the DiT
and its text encoder. Elementwise work (norms, softmax, RoPE, activations) is left out, as
in the PaLM / MaxText convention; `tests/perf/test_flops.py` checks the count against XLA's
cost analysis. A train step is 3x the forward (the backward costs two forwards); recomputation
under `model.remat` is not counted (it is overhead, not model work).
"""

import dataclasses

import ml_collections

from jaxvid import config as config_lib


@dataclasses.dataclass(frozen=True)
class Flops:
  """Forward FLOPs of one batch, by part."""
  blocks: float        # the DiT blocks: self-attention, cross-attention, MLP
  attention: float     # of which the q k^T and p v products (self and cross)
  embed: float         # patch, text and time embeddings, output projection
  text: float          # the text encoder

  @property
  def forward(self) -> float:
    return self.blocks + self.embed + self.text

  @property
  def train(self) -> float:
    return 3.0 * self.forward


def count(cfg: ml_collections.ConfigDict, batch: int, shape: tuple[int, int, int] | None = None) -> Flops:
  """Forward FLOPs of the DiT of `cfg` (and its text encoder) on `batch` clips of `shape`
  (frames, height, width of the pixel clips, whose latent grid the DiT sees; default video.*).
  An autoencoder's encoding is not counted."""
  m, t = cfg.model, cfg.text
  n = config_lib.num_tokens(cfg, shape)          # video tokens per clip
  d, f, l, dt = m.width, m.mlp_dim, t.max_len, t.width
  in_dim, patch_dim = config_lib.patch_dims(cfg)
  mm = lambda rows, k, cols: 2.0 * batch * rows * k * cols   # [batch*rows, k] @ [k, cols]

  self_proj = 4 * mm(n, d, d)                    # q, k, v, o
  self_attn = 2 * mm(n, d, n)                    # q k^T and p v over all heads: 2 * N * N * D each
  cross_proj = 2 * mm(n, d, d) + 2 * mm(l, d, d)  # q, o on video tokens; k, v on text tokens
  cross_attn = 2 * mm(n, d, l)
  mlp = 2 * mm(n, d, f)
  blocks = m.depth * (self_proj + self_attn + cross_proj + cross_attn + mlp)
  attention = m.depth * (self_attn + cross_attn)

  embed = (mm(n, in_dim, d) + mm(n, d, patch_dim)               # patch embedding (+ known mask), output
           + mm(l, dt, d) + mm(l, d, d)                         # text embedding MLP
           + mm(1, m.freq_dim, d) + mm(1, d, d) + mm(1, d, 6 * d))   # time embedding and projection

  text_block = 4 * mm(l, dt, dt) + 2 * mm(l, dt, l) + 2 * mm(l, dt, t.mlp_dim)
  return Flops(blocks=blocks, attention=attention, embed=embed, text=t.depth * text_block)
