"""DiT size variants, chosen by argument: S, B, L, XL (DiT paper widths) and Wan-1.3B.

  jaxvid train --config configs/dit.py:B --workdir runs/dit_b --config.mesh.fsdp=-1 --config.mesh.data=1

Variant sizes are a table, not copied files; everything else comes from `base_config()`.
Defaults target accelerators: bf16 compute, 16 frames of 64x64 pixels, patch 1x2x2.
"""

from jaxvid import config as config_lib

# name: (width, depth, heads, mlp_dim)
VARIANTS = {
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "XL": (1152, 28, 16, 4608),
    "wan1.3B": (1536, 30, 12, 8960),   # Wan 2.1 T2V-1.3B transformer shape (text width differs)
}


def get_config(arg: str = "B"):
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/dit.py; choose one of {', '.join(VARIANTS)}")
  width, depth, heads, mlp_dim = VARIANTS[arg]
  c = config_lib.base_config()
  c.model.update(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch=(1, 2, 2), dtype="bfloat16",
                 condition="mask")   # one model for text-to-video and the editing modes
  c.text.update(width=512, depth=4, heads=8, mlp_dim=2048, max_len=128)
  if arg == "wan1.3B":
    c.model.update(pos_embed="none", condition="none")   # Wan's T2V layout: RoPE only, no mask input
  c.train.update(batch_size=64, steps=100_000, log_every=100)
  c.checkpoint.update(every=2000, keep=3)
  return c
