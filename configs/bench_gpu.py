"""The GPU side-by-side model: Wan 2.1's 1.3B transformer shape on 33 frames of 256x256.

  jaxvid bench --config configs/bench_gpu.py
  python scripts/bench_torch.py --config configs/bench_gpu.py   # the same model in PyTorch

Width 1536, 30 layers, 12 heads of 128, MLP 8960 (Wan-1.3B; configs/dit.py:wan1.3B), RoPE
only and no mask input, as Wan lays it out. The clips are the latents of 33 frames of 256x256
under a 4x8x8 video autoencoder with 16 channels (Wan's and jaxvid's default): 9x32x32x16,
patch 1x2x2, so 2,304 tokens a clip; a batch of 8. 128 text tokens of width 512 from a one-layer
word encoder (Wan takes precomputed text embeddings of that width). bf16 compute, float32
parameters and AdamW state; attention "auto" (cuDNN's fused kernel on NVIDIA GPUs); the
matmul outputs saved for the backward pass and the rest recomputed (model.remat="dots"): on one
H200 a batch of 4 without remat took 94 GiB at 42% MFU, a batch of 8 with it 52 GiB at 57%.
"""

from jaxvid import config as config_lib


def get_config(arg: str = ""):
  del arg
  c = config_lib.base_config()
  c.video.update(frames=9, height=32, width=32, channels=16)
  c.model.update(patch=(1, 2, 2), width=1536, depth=30, heads=12, mlp_dim=8960, dtype="bfloat16",
                 pos_embed="none", condition="none", remat="dots")
  c.text.update(encoder="words", max_len=128, width=512, depth=1, heads=4, mlp_dim=2048)
  c.train.update(batch_size=8, steps=10)
  c.optim.update(weight_decay=0.01)
  c.sample.update(guidance=4.0)
  return c
