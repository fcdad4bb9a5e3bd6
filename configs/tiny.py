"""A tiny model that trains on the built-in synthetic data on one CPU: in pixel space (default),
or in the latent space of a VAE trained with configs/vae.py (`:latent`).

  jaxvid train --config configs/tiny.py --workdir runs/tiny
  jaxvid sample --workdir runs/tiny --prompt "a red circle moving left on a gray background" --output runs/tiny/samples

  jaxvid train --config configs/vae.py:S --workdir runs/vae
  jaxvid train --config configs/tiny.py:latent --workdir runs/tiny_latent --config.autoencoder.checkpoint=runs/vae
"""

from jaxvid import config as config_lib


def get_config(arg: str = ""):
  if arg not in ("", "latent"):
    raise ValueError(f"unknown variant {arg!r} of configs/tiny.py; choose '' (pixels) or 'latent'")
  c = config_lib.base_config()
  c.video.update(frames=8, height=32, width=32, channels=3, fps=8)
  c.model.update(patch=(2, 4, 4), width=128, depth=4, heads=4, mlp_dim=512, dtype="float32", condition="mask")
  c.text.update(encoder="words", max_len=16, width=64, depth=2, heads=4, mlp_dim=256)
  c.optim.update(lr=1e-3, warmup_steps=100, ema_decay=0.999)
  # 5 steps in one program (a whole number of calls per logging interval): 0.49 -> 0.38 s a step on a 2-core CPU.
  c.train.update(steps=2000, batch_size=8, log_every=50, steps_per_call=5)
  c.checkpoint.update(every=500, keep=2)
  c.sample.update(steps=20, guidance=4.0, batch_size=16)
  if arg == "latent":
    # 9 = 1 + 4 * 2 frames -> latents 3 x 4 x 4 x 16; one token per latent cell: 48 tokens.
    c.video.frames = 9
    c.model.patch = (1, 1, 1)
    c.autoencoder.update(name="vae", checkpoint="runs/vae", latent_channels=16, temporal_compression=4,
                         spatial_compression=8)
  return c
