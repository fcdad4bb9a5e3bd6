"""Causal 3D video VAE variants, chosen by argument: S (trains on a CPU), B, L; and S in three
stages, S_images, S_from_images, then S_decoder (see STAGES).

  jaxvid train --config configs/vae.py:S_images --workdir runs/vae_images
  jaxvid train --config configs/vae.py:S_from_images --workdir runs/vae_clips --init_from runs/vae_images
  jaxvid train --config configs/vae.py:S_decoder --workdir runs/vae --init_from runs/vae_clips
  jaxvid train --config configs/vae.py:S --workdir runs/vae          # S on clips from the start
  jaxvid train --config configs/tiny.py:latent --workdir runs/tiny_latent --config.autoencoder.checkpoint=runs/vae

Temporal compression 4 and spatial 8 (clips of 1 + 4k frames, sides divisible by 8), 16 latent
channels, 4x4 pixel patches folded into channels first, RMS norms, an MSE reconstruction loss
(on a fixed batch it reached 26 dB in 300 steps where L1 reached 15) plus a small KL, and
parameter-free shortcuts around every 2x resampling and the latent (`vae.shortcuts`: held-out
PSNR 18.5 vs 13.7 dB at step 250 of the 32-wide S). Variant
sizes are a table, not copied files; everything else comes from `base_config()` (the vae.* keys
there list every option).
`S` trains on the built-in synthetic clips at 9 x 32 x 32 (as `configs/tiny.py:latent` uses them;
being causal and convolutional it takes any 1 + 4k frames and any size) and reports held-out
PSNR/SSIM every 250 steps; the latent statistics the diffusion model needs are written when
training stops.
"""

from jaxvid import config as config_lib

# name: (channels, channel_mult, blocks per stage, batch). Stage widths are channels * channel_mult;
# the first is at least 48, the values of one 4x4 RGB patch, so it can carry them all (S: 48, 64, 64;
# with widths 32, 64, 64 held-out PSNR was 0.25 dB lower at the same step, for ~15% less time a step).
# S trains on batches of 4: on the CPU a step costs half of a batch of 8, and at equal time (two runs
# side by side, cosines over 6,000 and 3,000 steps: batch 4 at steps 500 / 1,000 / 1,500 against
# batch 8 at 250 / 500 / 750) held-out PSNR was 1.2 / 0.3 / 0.3 dB higher.
# The discriminator of an adversarial loss is as wide as the first stage.
VARIANTS = {
    "S": (16, (3, 4, 4), 1, 4),
    "B": (64, (1, 2, 4), 2, 32),
    "L": (128, (1, 2, 4), 2, 64),
}


# Three stages of S (the same network). Images first: an image step skips the causal kernels' zero
# past, and batches of 16 images run 18-21 steps/s on 2 CPU cores against 7-9 for 4 clips; the
# spatial coding is most of what there is to learn. Then clips: `--init_from` the image run
# inflates it to clips (`vae.inflate_from_images`), and the clip stage refines it at a lower
# learning rate. Last the decoder alone (`optim.frozen`: the encoder, so the latents and their
# statistics, stay as the clip stage left them) on `vae.clipped_range` (the loss on the
# reconstruction clipped to the pixel range, as it is shown): 30.2 dB on 64 held-out clips in 27.6
# minutes (471 + 866 + 318 s, 2026-11-30 and 12-01; on the 32 eval clips 28.4 dB after the clip
# stage, 30.7 after the decoder's), and the latent `tiny` on it keeps 100% color. Picked at equal
# time on 2-minute image runs: batch 16 at lr 3e-3 26.4 dB, against 25.6 at 1e-3 and 24.7 for
# batch 4 at 1e-3. The clipped range trained into the encoder as well (both first stages, clips at
# 5e-4) reached 29.1 dB, but the latent `tiny` on that VAE lost motion (31% direction, chance
# 25%); on the decoder alone it cannot touch the latents. From another clip stage (28.5 dB), 1,500
# decoder steps gave 30.4 dB on the 32 eval clips with the clipped range and 28.6 without it;
# training encoder and decoder together with it, 30.3 at 8.3 steps/s against the decoder's 11.4.
#   jaxvid train --config configs/vae.py:S_images --workdir runs/vae_images
#   jaxvid train --config configs/vae.py:S_from_images --workdir runs/vae_clips --init_from runs/vae_images
#   jaxvid train --config configs/vae.py:S_decoder --workdir runs/vae --init_from runs/vae_clips
STAGES = {
    "S_images": dict(frames=1, batch=16, steps=10_000, lr=3e-3, eval_every=1000),
    "S_from_images": dict(frames=9, batch=4, steps=7_000, lr=3e-4, eval_every=250),
    "S_decoder": dict(frames=9, batch=4, steps=3_000, lr=3e-4, eval_every=200, clipped_range=True,
                      frozen="^encoder/"),
}


def get_config(arg: str = "S"):
  if arg in STAGES:
    stage = STAGES[arg]
    c = get_config("S")
    c.video.frames = stage["frames"]
    c.train.steps, c.train.batch_size = stage["steps"], stage["batch"]
    c.optim.lr = stage["lr"]
    c.vae.eval_every = stage["eval_every"]
    c.vae.clipped_range = stage.get("clipped_range", False)
    c.optim.frozen = stage.get("frozen", "")
    return c
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/vae.py; choose one of {', '.join([*VARIANTS, *STAGES])}")
  channels, mult, blocks, batch = VARIANTS[arg]
  c = config_lib.base_config()
  c.model.name = "vae"
  c.vae.update(channels=channels, channel_mult=mult, blocks=blocks, latent_channels=16, temporal_compression=4,
               spatial_compression=8, patch=4, norm="rms", shortcuts=True, l1=0.0, mse=1.0, kl=1e-6, eval_every=250,
               eval_clips=32, stats_clips=64)
  c.video.update(frames=9, height=32, width=32, channels=3, fps=8)
  c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.0, ema_decay=0.999)
  c.train.update(steps=7600, batch_size=batch, log_every=50)   # S: 27.6 minutes on a 2-core CPU (2 devices)
  c.checkpoint.update(every=500, keep=2)
  if arg == "S":   # a CPU device per core: 3.3 -> 4.3-4.6 steps/s on 2 cores
    c.distributed.cpu_devices = 0
    c.train.steps_per_call = 5   # 5 steps in one program: 4.4 -> 5.2 steps/s on 2 cores
  else:   # accelerators: larger clips, bfloat16 compute
    c.video.update(frames=17, height=128, width=128)
    c.vae.dtype = "bfloat16"
    c.train.update(steps=100_000, log_every=100)
    c.checkpoint.update(every=2000, keep=3)
  return c
