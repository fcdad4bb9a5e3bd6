"""The side-by-side benchmark model (~20M parameters) at the size the PyTorch comparison uses.

  jaxvid bench --config configs/bench_cpu.py
  python scripts/bench_torch.py            # the same model in PyTorch (diffusers' Wan transformer)

Width 384, 6 heads of 64, MLP 1536, 8 layers, patch 1x2x2 over 4 latent channels, 32 text
tokens of width 64: a batch of 2 latent videos of 8 frames of 32x32 is 2,048 tokens each.
"""

from jaxvid import config as config_lib


def get_config(arg: str = ""):
  del arg
  c = config_lib.base_config()
  c.video.update(frames=8, height=32, width=32, channels=4)
  c.model.update(patch=(1, 2, 2), width=384, depth=8, heads=6, mlp_dim=1536, dtype="float32",
                 scan_unroll=8)   # all layers in one program: train step ~9% faster on CPU (compile 14 -> 25 s)
  c.text.update(encoder="words", max_len=32, width=64, depth=1, heads=1, mlp_dim=256)
  c.train.update(batch_size=2, steps=10, steps_per_call=4)   # 4 steps a call: train step ~12% faster on CPU
  c.distributed.cpu_devices = 0   # a CPU device per core (2 here): train step ~20% faster, forward ~25%
  c.optim.update(weight_decay=0.01)
  c.sample.update(guidance=4.0)
  return c
